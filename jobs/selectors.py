"""Every read the pages and the API need.

History lists use keyset (cursor) pagination over (created_at, id), newest first:
no COUNT(*) and no OFFSET, so page 1 and page 10,000 cost the same, each served by
an index whose leading column is the filter (see Job.Meta.indexes).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime

import django_filters
from django.db.models import Q, TextField
from django.db.models.functions import Cast
from django.http import Http404

from jobs.models import Job, JobLog, JobState, JobType


class JobFilter(django_filters.FilterSet):
    """History filters, shared by the history page and the API."""

    state = django_filters.ChoiceFilter(choices=JobState.choices, empty_label="Any state")
    job_type = django_filters.ModelChoiceFilter(
        queryset=JobType.objects.all(), to_field_name="name", empty_label="Any job type"
    )
    queue = django_filters.CharFilter(label="Queue")
    submitted_by = django_filters.CharFilter(
        field_name="submitted_by__username", label="Submitted by"
    )
    schedule = django_filters.CharFilter(field_name="schedule_name", label="Schedule")
    submitted_after = django_filters.DateTimeFilter(
        field_name="created_at", lookup_expr="gte", label="Submitted from"
    )
    submitted_before = django_filters.DateTimeFilter(
        field_name="created_at", lookup_expr="lt", label="Submitted before"
    )
    q = django_filters.CharFilter(method="search", label="Search")

    class Meta:
        model = Job
        fields: list[str] = []

    def search(self, queryset, name, value):
        """Run id prefix, or text in the parameters or the error."""
        value = value.strip()
        if not value:
            return queryset
        if _looks_like_id(value):
            return queryset.filter(pk__startswith=value.lower())
        return queryset.alias(params_text=Cast("params", TextField())).filter(
            Q(params_text__icontains=value) | Q(error_message__icontains=value)
        )


def _looks_like_id(value: str) -> bool:
    return len(value) >= 4 and all(c in "0123456789abcdefABCDEF-" for c in value)


@dataclass
class Page:
    rows: list[Job]
    next_cursor: str | None


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.pk]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ValueError on a cursor Jobsite did not make."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, pk = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(created), str(pk)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ValueError("Invalid cursor") from exc


def job_list(*, user, filters: dict | None = None) -> tuple[JobFilter, object]:
    """The runs the user may see, filtered; returns the bound filter and its queryset."""
    base = Job.objects.visible_to(user).select_related("job_type", "submitted_by")
    job_filter = JobFilter(filters or {}, queryset=base)
    return job_filter, job_filter.qs if job_filter.is_valid() else base.none()


def job_page(queryset, *, cursor: str | None, size: int) -> Page:
    """One page of runs after ``cursor`` (newest first)."""
    queryset = queryset.order_by("-created_at", "-id")
    if cursor:
        created, pk = decode_cursor(cursor)
        queryset = queryset.filter(Q(created_at__lt=created) | Q(created_at=created, pk__lt=pk))
    rows = list(queryset[: size + 1])
    next_cursor = encode_cursor(rows[size - 1]) if len(rows) > size else None
    return Page(rows=rows[:size], next_cursor=next_cursor)


def job_get(*, user, job_id: str) -> Job:
    """A run the user may see, or 404 (not 403: others' runs are not revealed)."""
    queryset = Job.objects.visible_to(user).select_related(
        "job_type", "submitted_by", "schedule", "parent"
    )
    try:
        return queryset.get(pk=job_id)
    except Job.DoesNotExist:
        raise Http404("No such run.") from None


def job_logs(*, job: Job, limit: int = 1000) -> list[JobLog]:
    return list(job.logs.all()[:limit])


def job_children(*, job: Job, user) -> list[Job]:
    """Reruns of this run and steps of the workflow it started."""
    visible = Job.objects.visible_to(user)
    return list(visible.filter(Q(parent=job) | Q(workflow_id=job.pk)).order_by("created_at")[:100])


def job_timeline(job: Job) -> list[tuple[str, datetime]]:
    """The run's state transitions with their times, oldest first."""
    events: list[tuple[str, datetime]] = [("Submitted", job.created_at)]
    if job.sent_at:
        events.append(("Sent to broker", job.sent_at))
    if job.received_at:
        events.append(("Received by worker", job.received_at))
    if job.started_at:
        events.append(("Started", job.started_at))
    for entry in job.retry_history:
        at = datetime.fromisoformat(entry["at"])
        events.append((f"Retry {entry['attempt']}: {entry.get('reason', '')}"[:200], at))
    if job.finished_at:
        events.append((job.get_state_display(), job.finished_at))
    return sorted(events, key=lambda event: event[1])


def job_types_runnable(*, user) -> list[JobType]:
    from jobs import catalog

    return [jt for jt in JobType.objects.runnable_by(user) if catalog.get(jt.name)]
