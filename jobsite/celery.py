"""The Celery application: configured from Django settings (CELERY_* names), wired to
Jobsite by jobs.celery.install — the same call a project of your own makes."""

import os

from celery import Celery

import jobs.celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")

app = Celery("jobsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
jobs.celery.install(app)
app.autodiscover_tasks()
