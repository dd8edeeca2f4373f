"""Jobsite's URLs: the pages and the API, for one ``include("jobs.urls")``."""

from django.urls import include, path

urlpatterns = [
    path("api/", include("jobs.api.urls")),
    path("", include("jobs.web.urls")),
]
