"""/api/...: the JSON API, its OpenAPI schema and its documentation page.

API views opt out of LoginRequiredMiddleware's redirect: DRF's IsAuthenticated answers
an anonymous request with a JSON 401 instead. The docs page is for people in a browser,
so it keeps the redirect to the login page.
"""

from django.contrib.auth.decorators import login_not_required
from django.urls import path
from drf_spectacular.renderers import OpenApiJsonRenderer, OpenApiYamlRenderer
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.renderers import JSONRenderer

from jobs.api import views


def _api(view_class, **initkwargs):
    return login_not_required(view_class.as_view(**initkwargs))


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
