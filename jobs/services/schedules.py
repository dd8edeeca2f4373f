"""Schedules (django-celery-beat's PeriodicTask): saved, enabled, deleted, run now."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from jobs import specs
from jobs.models import (
    AuditAction,
    AuditOutcome,
    Job,
    JobSource,
    JobType,
)
from jobs.services.audit import audit_record
from jobs.services.errors import ActionError
from jobs.services.messages import _effective_options, _parse_time, header_refusal
from jobs.services.runs import job_publish, job_type_masked

logger = logging.getLogger(__name__)

# --- Schedules (django-celery-beat's PeriodicTask) ----------------------------------
# Every change reaches a running beat without a restart: PeriodicTask.save()/delete()
# mark the change themselves; bulk updates (queryset.update) call update_changed().


def _audit_schedule(user, action: str, schedule, outcome=AuditOutcome.OK, **details) -> None:
    audit_record(
        actor=user,
        action=action,
        target_type="schedule",
        target_id=schedule.pk,
        target_repr=schedule.name,
        outcome=outcome,
        details=details,
    )


def schedule_save(*, schedule, user, created: bool, changed: list[str] | None = None):
    """Store a schedule already validated by the admin form, and audit it."""
    with transaction.atomic():
        schedule.save()
        action = AuditAction.SCHEDULE_CREATE if created else AuditAction.SCHEDULE_CHANGE
        _audit_schedule(
            user, action, schedule, task=schedule.task, enabled=schedule.enabled,
            changed=changed or [],
        )  # fmt: skip
    return schedule


def schedule_set_enabled(*, schedules, enabled: bool, user) -> int:
    """Enable or disable many schedules in one UPDATE; returns how many."""
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    targets = list(schedules)
    # As PeriodicTask.save(): a disabled schedule forgets its last run, so that once
    # enabled again it counts from then instead of catching up.
    fields: dict[str, bool | None] = (
        {"enabled": True} if enabled else {"enabled": False, "last_run_at": None}
    )
    action = AuditAction.SCHEDULE_ENABLE if enabled else AuditAction.SCHEDULE_DISABLE
    with transaction.atomic():
        count = PeriodicTask.objects.filter(pk__in=[s.pk for s in targets]).update(**fields)
        PeriodicTasks.update_changed()  # update() sends no signal: tell beat ourselves
        for schedule in targets:
            _audit_schedule(user, action, schedule)
    return count


def schedule_delete(*, schedules, user) -> int:
    """Delete schedules (their runs keep the schedule's name); returns how many."""
    targets = list(schedules)
    with transaction.atomic():
        for schedule in targets:
            _audit_schedule(user, AuditAction.SCHEDULE_DELETE, schedule, task=schedule.task)
            schedule.delete()  # PeriodicTask.delete() tells beat
    return len(targets)


def schedule_run_now(*, schedule, user) -> Job:
    """Send one run of a schedule now, with all of its options, recorded as a Job.

    Unlike django-celery-beat's "Run selected tasks" action, the run keeps the
    schedule's queue, exchange, routing key, priority, expiry and headers, and its
    parameters are checked again by the job type's form. Raises ActionError when the
    schedule's task is not catalogued, its job type is internal, disabled or one the
    user may not run, its parameters are no longer valid, its stored headers would
    replace Celery's (a schedule written elsewhere than the admin form), or it has
    expired.
    """
    job_type, params = _schedule_job_type_and_params(schedule)
    refusal = job_type.submit_refusal(user)
    if refusal:
        raise ActionError(refusal)
    options = _schedule_options(schedule, job_type)
    refusal = header_refusal(options["headers"])
    if refusal:
        raise ActionError(f"“{schedule.name}” is not sent: {refusal}.")
    job = Job(
        id=str(uuid.uuid4()),
        job_type=job_type,
        task_name=job_type.task_name,
        params=params,
        options=options,
        source=JobSource.SCHEDULE_NOW,
        submitted_by=user,
        schedule=schedule,
        schedule_name=schedule.name,
    )
    job.queue, job.priority = job.options["queue"], job.options["priority"]
    job.expires_at = _parse_time(job.options.get("expires_at"))
    with transaction.atomic():
        job.save(force_insert=True)
        _audit_schedule(
            user, AuditAction.SCHEDULE_RUN_NOW, schedule, run=job.pk,
            params=job_type_masked(job_type, params),
        )  # fmt: skip
        transaction.on_commit(lambda: job_publish(job=job))
    return job


def _schedule_job_type_and_params(schedule) -> tuple[JobType, dict]:
    spec = specs.by_task_name(schedule.task)
    job_type = JobType.objects.filter(name=spec.name).first() if spec else None
    if spec is None or job_type is None:
        raise ActionError(f"“{schedule.name}” runs {schedule.task}, which is not in the catalogue.")
    if schedule.expires and schedule.expires <= timezone.now():
        raise ActionError(f"“{schedule.name}” expired on {schedule.expires:%Y-%m-%d %H:%M}.")
    try:
        raw = json.loads(schedule.kwargs or "{}")
    except ValueError:
        raw = None
    params, errors = spec.clean_params(raw if isinstance(raw, dict) else None)
    if params is None:
        problems = "; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in errors.items())
        raise ActionError(f"The schedule's parameters are not valid any more ({problems}).")
    return job_type, params


def _schedule_options(schedule, job_type: JobType) -> dict:
    given = {"queue": schedule.queue, "priority": schedule.priority}
    options = _effective_options(job_type, given)
    options.pop("idempotency_key", None)
    options.pop("eta", None)
    options.pop("expires_at", None)
    if schedule.expire_seconds:
        expires_at = timezone.now() + timedelta(seconds=schedule.expire_seconds)
        options["expires_at"] = expires_at.isoformat()
    elif schedule.expires:
        options["expires_at"] = schedule.expires.isoformat()
    try:
        headers = json.loads(schedule.headers or "{}")
    except ValueError:
        headers = {}
    options.update(
        exchange=schedule.exchange or None,
        routing_key=schedule.routing_key or None,
        headers=headers if isinstance(headers, dict) else {},
    )
    return options
