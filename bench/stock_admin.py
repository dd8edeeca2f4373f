"""A URLconf for bench.history: Jobsite's URLs plus django-celery-results' STOCK admin.

Jobsite replaces the TaskResult admin with a tuned one (jobs/admin.py); the baseline
is the changelist people get from django-celery-results itself, so it is mounted
here, on a throwaway AdminSite at /stock-admin/.
"""

from django.contrib.admin import AdminSite
from django.urls import include, path
from django_celery_results.admin import TaskResultAdmin
from django_celery_results.models import TaskResult

stock_site = AdminSite(name="stock-admin")
stock_site.register(TaskResult, TaskResultAdmin)

urlpatterns = [
    path("stock-admin/", stock_site.urls),
    path("", include("jobsite.urls")),
]
