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
from django.db.models import Count, Q, QuerySet, TextField
from django.db.models.functions import Cast
from django.http import Http404

from jobs import specs, workflows
from jobs.models import (
    NOT_STARTED_STATES,
    RETRYABLE_STATES,
    ApiToken,
    AuditEntry,
    Job,
    JobLog,
    JobSource,
    JobState,
    JobType,
)


class JobFilter(django_filters.FilterSet):
    """History filters, shared by the history page and the API."""

    state = django_filters.ChoiceFilter(choices=JobState.choices, empty_label="Any state")
    job_type = django_filters.ModelChoiceFilter(
        queryset=JobType.objects.all(), to_field_name="name", empty_label="Any job type"
    )
    # A task the catalogue does not know (runs seen through events) is found by its name.
    task = django_filters.CharFilter(field_name="task_name", label="Celery task")
    source = django_filters.ChoiceFilter(choices=JobSource.choices, empty_label="Any source")
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
        """Run id prefix, or text in the parameters or the error.

        The parameters of job types with secret fields are never searched: a viewer
        sees every run masked, and a match inside a secret would give it away one
        character at a time. Those runs are found by id or error text. The exclusion
        keeps the trigram index on ``UPPER(params::text)`` serving the search.
        """
        value = value.strip()
        if not value:
            return queryset
        if _looks_like_id(value):
            return queryset.filter(pk__startswith=value.lower())
        in_params = Q(params_text__icontains=value)
        secret_tasks = [s.task_name for s in specs.all_specs() if s.secret_fields]
        if secret_tasks:
            in_params &= ~Q(task_name__in=secret_tasks)
        return queryset.alias(params_text=Cast("params", TextField())).filter(
            in_params | Q(error_message__icontains=value)
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


def job_list(*, user, filters: dict | None = None) -> tuple[JobFilter, QuerySet[Job]]:
    """The runs the user may see, filtered; returns the bound filter and its queryset."""
    base = Job.objects.visible_to(user).select_related("job_type", "submitted_by")
    job_filter = JobFilter(filters or {}, queryset=base)
    return job_filter, job_filter.qs if job_filter.is_valid() else base.none()


def job_page(queryset, *, cursor: str | None, size: int) -> Page:
    """One page of runs after ``cursor`` (newest first)."""
    queryset = queryset.order_by("-created_at", "-id")
    if cursor:
        created, pk = decode_cursor(cursor)
        # created_at <= … is implied by the OR, but spelled out it bounds the index
        # range scan: the OR alone is a filter, read from the newest row onwards.
        queryset = queryset.filter(
            Q(created_at__lte=created),
            Q(created_at__lt=created) | Q(created_at=created, pk__lt=pk),
        )
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
    # A run seen through events was submitted elsewhere, when is not known; it was sent
    # when a task-sent event says so.
    seen = job.source == JobSource.EVENTS
    events: list[tuple[str, datetime]] = [] if seen else [("Submitted", job.created_at)]
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
    """The catalogue a user may submit from (internal job types are never listed)."""
    internal = specs.internal_names()
    return [
        jt
        for jt in JobType.objects.runnable_by(user)
        if specs.get(jt.name) and jt.name not in internal
    ]


# --- Control ------------------------------------------------------------------------


def jobs_unfinished_by_task(*, user) -> list[dict]:
    """Per task name, the user's visible runs waiting and running (the page's counts).

    The state index bounds it to the unfinished runs, however long the history.
    """
    waiting = Count("id", filter=Q(state__in=NOT_STARTED_STATES))
    rows = (
        Job.objects.visible_to(user)
        .unfinished()
        .values("task_name")
        .annotate(waiting=waiting, running=Count("id", filter=~Q(state__in=NOT_STARTED_STATES)))
        .order_by("task_name")
    )
    return list(rows)


def job_can_control(*, user, job: Job) -> bool:
    return job.submitted_by_id == user.pk or user.has_perm("jobs.control_jobs")


def jobs_controllable(queryset, *, user):
    """The runs of ``queryset`` the user may act on, or None if they may act on none."""
    if user.has_perm("jobs.control_jobs"):
        return queryset
    if not Job.objects.filter(submitted_by=user).exists():
        return None
    return queryset.filter(submitted_by=user)


def job_actions(*, user, job: Job) -> set[str]:
    """The actions this user may take on this run now (buttons shown on its page)."""
    if not job_can_control(user=user, job=job):
        return set()
    actions = set()
    if job.state in (JobState.PENDING, JobState.RECEIVED, JobState.RETRY):
        actions.add("cancel")
    if job.state in (JobState.STARTED, JobState.PROGRESS):
        actions.add("terminate")
    # A run seen through events has the parameters its event showed (reprs, masked):
    # not ones Jobsite can send again.
    resendable = bool(job.job_type_id) and job.source != JobSource.EVENTS
    if resendable and job.state in RETRYABLE_STATES:
        actions.add("retry")
    if resendable:
        actions.add("rerun")
    if job.is_finished:
        actions.add("delete")
    return actions


def job_audit(*, job: Job, limit: int = 50) -> list[AuditEntry]:
    return list(
        AuditEntry.objects.filter(target_type="run", target_id=job.pk).order_by("-created_at")[
            :limit
        ]
    )


def job_params_display(job: Job) -> dict:
    """Parameters as shown to people: secret fields masked."""
    spec = specs.get(job.job_type.name) if job.job_type else None
    return spec.mask(job.params) if spec else job.params


def unmask(spec, edited: dict, original: dict) -> dict:
    """A rerun form shows secrets masked: an unchanged mask keeps the original value."""
    return {
        key: original.get(key) if key in spec.secret_fields and value == specs.MASK else value
        for key, value in edited.items()
    }


# --- API and API tokens -------------------------------------------------------------


def periodic_task_list(*, user) -> list:
    """django-celery-beat's schedules the user may see, by name.

    With ``django_celery_beat.view_periodictask`` (superusers have it), every schedule,
    as in the admin; other staff only those of job types they may run.
    """
    from django_celery_beat.models import PeriodicTask

    related = ("interval", "crontab", "solar", "clocked")
    queryset = PeriodicTask.objects.select_related(*related).order_by("name")
    if not user.has_perm("django_celery_beat.view_periodictask"):
        runnable = JobType.objects.runnable_by(user).values_list("task_name", flat=True)
        queryset = queryset.filter(task__in=list(runnable))
    return list(queryset)


def api_token_list(*, user) -> list:
    """The user's own API tokens, newest first (revoked ones too, marked)."""
    return list(ApiToken.objects.filter(user=user).order_by("-created_at"))


def api_token_get(*, user, token_id: int):
    """One of the user's own tokens, or 404."""
    try:
        return ApiToken.objects.select_related("user").get(pk=token_id, user=user)
    except ApiToken.DoesNotExist:
        raise Http404("No such token.") from None


# --- Workflows ----------------------------------------------------------------------


def workflow_templates_runnable(*, user) -> list:
    """The workflow templates whose every step's job type the user may run."""
    runnable = {jt.name for jt in JobType.objects.runnable_by(user)}
    return [
        t
        for t in workflows.TEMPLATES.values()
        if t.job_type_names() - specs.internal_names() <= runnable
    ]


def workflow_tree(*, job: Job, user) -> dict | None:
    """The workflow a run belongs to, as its plan with each step's run attached.

    None when the run is not part of a workflow Jobsite submitted (or its root is not
    visible to the user). ``extra`` holds the workflow's runs that are not planned
    steps: the errback's, when a step failed.
    """
    root_id = job.workflow_id or job.pk
    visible = Job.objects.visible_to(user)
    root = job if job.pk == root_id else visible.filter(pk=root_id).first()
    plan = (root.options or {}).get("workflow", {}).get("plan") if root else None
    if root is None or not plan:
        return None
    runs = {r.pk: r for r in visible.filter(workflow_id=root_id).select_related("job_type")}
    planned = set()

    def attach(node: dict) -> dict:
        if node["type"] == "step":
            planned.add(node["id"])
            return {**node, "run": runs.get(node["id"])}
        return {**node, "children": [attach(child) for child in node["children"]]}

    tree = attach(plan)
    steps = [runs[pk] for pk in planned if pk in runs]
    return {
        "root": root,
        "info": root.options["workflow"],
        "tree": tree,
        "extra": sorted(
            (r for pk, r in runs.items() if pk not in planned), key=lambda r: r.created_at
        ),
        # Settled: every step finished and, after a failure, the errback has recorded it.
        "finished": all(r.is_finished for r in steps)
        and ("failure" in root.options["workflow"] or all(r.state != "FAILURE" for r in steps)),
        "states": _count_states(steps),
    }


def _count_states(runs: list[Job]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for run in runs:
        label = run.get_state_display()
        counts[label] = counts.get(label, 0) + 1
    return sorted(counts.items())
