"""The dashboard: the home page, its live fragments and the JSON its charts read.

The page renders the cheap database aggregates at once; workers, queues and beat
(remote-control pings and broker round trips, up to a second or two) come in their
own fragment, loaded by htmx after the page, so they never hold the page up.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from jobs.models import JobState
from jobs.selectors import schedules, stats


def _summary_context(user) -> dict:
    counts = stats.runs_by_state(user=user)
    return {
        "states": [(state, label, counts.get(state, 0)) for state, label in JobState.choices],
        "timings": stats.timings(user=user),
        "failures": stats.failure_groups(user=user),
        "sees_all": user.has_perm("jobs.view_all_jobs"),
    }


@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "jobs/dashboard.html", _summary_context(request.user))


@require_GET
def dashboard_summary(request: HttpRequest) -> HttpResponse:
    context = _summary_context(request.user)
    return render(request, "jobs/partials/dashboard_summary.html", context)


@require_GET
def dashboard_system(request: HttpRequest) -> HttpResponse:
    context = {
        "system": stats.system_status(),
        "beat_warn_after": stats.BEAT_WARN_AFTER,
        "beat": schedules.beat_status(),  # which beat leads, which stand by
    }
    return render(request, "jobs/partials/dashboard_system.html", context)


@require_GET
def dashboard_data(request: HttpRequest) -> JsonResponse:
    user = request.user
    return JsonResponse(
        {
            "generated_at": timezone.now().isoformat(),
            "states": stats.runs_by_state(user=user),
            "minute": stats.throughput(user=user, period="minute"),
            "hour": stats.throughput(user=user, period="hour"),
        }
    )
