"""Jobsite's URLs: the pages and the API, for one ``include("jobs.urls")``."""

from django.contrib.admin.utils import quote, unquote
from django.urls import include, path, register_converter


class RunIdConverter:
    """A run id in one path segment, whatever it holds.

    Run ids are Celery task ids, and a broker writer may send any text, a ``/``
    included, which a plain ``str`` segment cannot carry (``reverse()`` fails and the
    whole history page with it), and a ``%2F`` does not help: the server decodes it
    before Django matches the URL. So ids are escaped as the admin escapes primary
    keys (``/`` becomes ``_2F``); a UUID, as Celery makes them, stays as it is.
    """

    regex = "[^/]+"

    def to_python(self, value: str) -> str:
        return unquote(value)

    def to_url(self, value: str) -> str:
        return quote(value)


# Before the faces' URLconfs are imported: both use it.
register_converter(RunIdConverter, "runid")

urlpatterns = [
    path("api/", include("jobs.api.urls")),
    path("", include("jobs.web.urls")),
]
