"""/api/...: the JSON API, its OpenAPI schema and its documentation page.

API views opt out of LoginRequiredMiddleware's redirect: DRF's IsAuthenticated answers
an anonymous request with a JSON 401 instead. The docs page is for people in a browser,
so it keeps the redirect to the login page.
"""

from django.contrib.auth.decorators import login_not_required
from django.urls import path
from drf_spectacular.renderers import OpenApiJsonRenderer, OpenApiYamlRenderer
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.authentication import SessionAuthentication
from rest_framework.parsers import JSONParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.views import APIView

from jobs.api import views
from jobs.api.auth import ApiTokenAuthentication

# Jobsite's API behaves the same in any project, whatever its REST_FRAMEWORK defaults:
# token or session, authenticated, JSON in and out. A view's own choice comes first.
API_POLICY = {
    "authentication_classes": [ApiTokenAuthentication, SessionAuthentication],
    "permission_classes": [IsAuthenticated],
    "renderer_classes": [JSONRenderer],
    "parser_classes": [JSONParser],
}


def _api(view_class, **initkwargs):
    for name, value in API_POLICY.items():
        if name not in initkwargs and not _declares(view_class, name):
            initkwargs[name] = value
    return login_not_required(view_class.as_view(**initkwargs))


def _declares(view_class, name: str) -> bool:
    """Whether the view (or a base of its own, below DRF's APIView) sets ``name``."""
    return any(name in vars(cls) for cls in view_class.__mro__ if cls not in APIView.__mro__)


# JSON by default (errors too); ?format=yaml for YAML.
SCHEMA_RENDERERS = [JSONRenderer, OpenApiJsonRenderer, OpenApiYamlRenderer]


urlpatterns = [
    path("runs/", _api(views.RunListView), name="api-run-list"),
    path("runs/bulk/", _api(views.RunBulkView), name="api-run-bulk"),
    path("runs/<runid:job_id>/", _api(views.RunDetailView), name="api-run-detail"),
    path("runs/<runid:job_id>/cancel/", _api(views.RunCancelView), name="api-run-cancel"),
    path("runs/<runid:job_id>/retry/", _api(views.RunRetryView), name="api-run-retry"),
    path("job-types/", _api(views.JobTypeListView), name="api-job-type-list"),
    path("schedules/", _api(views.ScheduleListView), name="api-schedule-list"),
    path("schema", _api(SpectacularAPIView, renderer_classes=SCHEMA_RENDERERS), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
