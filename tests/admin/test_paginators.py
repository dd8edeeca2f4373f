"""Admin lists over big tables never count them whole (jobs.admin.paginators)."""

from __future__ import annotations

from django.urls import reverse

from jobs.admin.paginators import EstimatedCountPaginator
from jobs.models import Job


def test_admin_lists_of_runs_and_results_never_count_the_whole_table(admin_client, runs):
    for url in (
        reverse("admin:jobs_job_changelist"),
        reverse("admin:django_celery_results_taskresult_changelist"),
        reverse("admin:django_celery_results_groupresult_changelist"),
        reverse("admin:jobs_alert_changelist"),
    ):
        response = admin_client.get(url)
        assert response.status_code == 200, url
        assert isinstance(response.context["cl"].paginator, EstimatedCountPaginator)


def test_the_estimated_paginator_stops_counting_at_its_cap(runs, monkeypatch):
    monkeypatch.setattr(EstimatedCountPaginator, "CAP", 5)

    assert EstimatedCountPaginator(Job.objects.all(), 100).count >= 6
    assert EstimatedCountPaginator(Job.objects.filter(state="FAILURE"), 100).count == 6
    assert EstimatedCountPaginator(Job.objects.filter(state="SUCCESS"), 100).count == 5
