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
    ScheduleVersion,
)
from jobs.selectors.schedules import (
    JSON_FIELDS,
    SCHEDULE_KINDS,
    SNAPSHOT_FIELDS,
    TIME_FIELDS,
    schedule_snapshot,
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
    """Store a schedule already validated by the admin form, audit it, keep a version."""
    from django_celery_beat.models import PeriodicTask

    with transaction.atomic():
        stored = (
            None if created else PeriodicTask.objects.select_for_update().filter(pk=schedule.pk)
        )
        before = schedule_snapshot(stored.first()) if stored is not None else None
        schedule.save()
        action = AuditAction.SCHEDULE_CREATE if created else AuditAction.SCHEDULE_CHANGE
        _audit_schedule(
            user, action, schedule, task=schedule.task, enabled=schedule.enabled,
            changed=changed or [],
        )  # fmt: skip
        _record_version(schedule, user, action, before=before, after=schedule_snapshot(schedule))
    return schedule


def schedule_set_enabled(*, schedules, enabled: bool, user) -> int:
    """Enable or disable many schedules in one UPDATE; returns how many."""
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    # As PeriodicTask.save(): a disabled schedule forgets its last run, so that once
    # enabled again it counts from then instead of catching up.
    fields: dict[str, bool | None] = (
        {"enabled": True} if enabled else {"enabled": False, "last_run_at": None}
    )
    action = AuditAction.SCHEDULE_ENABLE if enabled else AuditAction.SCHEDULE_DISABLE
    pks = [s.pk for s in schedules]
    with transaction.atomic():
        # Locked and read again: each version's "before" is what was stored, not the page.
        targets = list(PeriodicTask.objects.select_for_update().filter(pk__in=pks).order_by("pk"))
        count = PeriodicTask.objects.filter(pk__in=pks).update(**fields)
        PeriodicTasks.update_changed()  # update() sends no signal: tell beat ourselves
        for schedule in targets:
            _audit_schedule(user, action, schedule)
            if schedule.enabled != enabled:
                before = schedule_snapshot(schedule)
                _record_version(
                    schedule, user, action, before=before, after={**before, "enabled": enabled}
                )
    return count


def schedule_delete(*, schedules, user) -> int:
    """Delete schedules (their runs and versions keep the schedule's name); returns how many."""
    targets = list(schedules)
    with transaction.atomic():
        for schedule in targets:
            _audit_schedule(user, AuditAction.SCHEDULE_DELETE, schedule, task=schedule.task)
            _record_version(
                schedule, user, AuditAction.SCHEDULE_DELETE,
                before=schedule_snapshot(schedule), after=None,
            )  # fmt: skip
            schedule.delete()  # PeriodicTask.delete() tells beat
    return len(targets)


# --- Versions (snapshots: jobs.selectors.schedules.schedule_snapshot) ----------------


def _record_version(schedule, user, action: str, *, before, after, restored_from=None):
    """Store one version of ``schedule``, unless nothing a person sets has changed.

    A schedule made before versions were kept gets its stored state as version 1
    first, so that its first change can be undone too. Call inside the transaction
    that writes the schedule (its row is locked, so numbers do not collide).
    """
    before, after = before or {}, after or {}
    changed = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
    if not changed:
        return None
    number = (
        ScheduleVersion.objects.filter(schedule_id=schedule.pk)
        .order_by("-number")
        .values_list("number", flat=True)
        .first()
    )
    if number is None and before:
        ScheduleVersion.objects.create(
            schedule_id=schedule.pk, schedule_name=before.get("name") or schedule.name,
            number=1, actor_name="(stored before versions were kept)",
            action=AuditAction.SCHEDULE_CREATE, before={}, after=before,
            changed=sorted(before),
        )  # fmt: skip
        number = 1
    return ScheduleVersion.objects.create(
        schedule_id=schedule.pk,
        schedule_name=schedule.name,
        number=(number or 0) + 1,
        actor=user if getattr(user, "pk", None) else None,
        actor_name=getattr(user, "username", "") or str(user or "system"),
        action=action,
        before=before,
        after=after,
        changed=changed,
        restored_from=restored_from,
    )


def schedule_restore(*, schedule_id, version_id, user):
    """Put a schedule back as one of its versions left it; that is a new version.

    Refused (ActionError, nothing written; the attempt is audited as denied or failed)
    when the user may not change schedules or this schedule's job type, the version is
    missing or belongs to another schedule, it is a deletion, or its state cannot be
    stored now: its job type left the catalogue or is not one the user may run, its
    parameters are no longer valid, its interval/crontab/solar/clocked time was
    deleted, or another schedule took its name.
    """
    from django_celery_beat.models import PeriodicTask

    with transaction.atomic():
        schedule = PeriodicTask.objects.select_for_update().filter(pk=schedule_id).first()
        if schedule is None:
            raise ActionError("No such schedule.")
        details: dict = {"version": version_id}
        refusal = _restore(schedule, version_id, user, details)
    if refusal:
        # Outside the rolled-back transaction, so that the refused attempt stays audited.
        message, outcome = refusal
        _audit_schedule(
            user, AuditAction.SCHEDULE_RESTORE, schedule, outcome, **details, error=message
        )
        raise ActionError(message)
    return schedule


def _restore(schedule, version_id, user, details: dict) -> tuple[str, str] | None:
    """Restore inside the caller's transaction; (message, outcome) when refused."""
    if not _may_change(user, schedule.task):
        return "You may not change this schedule.", AuditOutcome.DENIED
    version = ScheduleVersion.objects.filter(pk=version_id).first() if version_id else None
    if version is None or version.schedule_id != schedule.pk:
        return "This schedule has no such version.", AuditOutcome.FAILED
    details["version"] = version.number
    target = version.after
    if not target:
        message = f"Version {version.number} deleted the schedule: nothing to restore."
        return message, AuditOutcome.FAILED
    if not _may_change(user, target.get("task")):
        message = (
            f"Version {version.number} runs {target.get('task')}, a job type you may not schedule."
        )
        return message, AuditOutcome.DENIED
    problem = _restore_problem(schedule, target)
    if problem:
        return f"Version {version.number} cannot be restored: {problem}.", AuditOutcome.FAILED
    before = schedule_snapshot(schedule)
    _apply_snapshot(schedule, target)
    schedule.save()  # PeriodicTask.save() tells beat
    _audit_schedule(
        user, AuditAction.SCHEDULE_RESTORE, schedule, **details,
        changed=sorted(k for k in target if before.get(k) != target.get(k)),
    )  # fmt: skip
    _record_version(
        schedule, user, AuditAction.SCHEDULE_RESTORE,
        before=before, after=schedule_snapshot(schedule), restored_from=version,
    )  # fmt: skip
    return None


def _may_change(user, task_name) -> bool:
    """As the schedule admin: change permission, and a catalogued job type the user may run."""
    if not user.has_perm("django_celery_beat.change_periodictask"):
        return False
    spec = specs.by_task_name(task_name) if task_name else None
    if spec is None or spec.internal:
        return False
    return (
        bool(user.is_superuser)
        or JobType.objects.runnable_by(user).filter(task_name=task_name).exists()
    )


def _restore_problem(schedule, target: dict) -> str:
    from django_celery_beat import models as beat

    kinds = [k for k in SCHEDULE_KINDS if target.get(k) is not None]
    if len(kinds) != 1:
        return "it has no single interval, crontab, solar or clocked time"
    model = {
        "interval": beat.IntervalSchedule, "crontab": beat.CrontabSchedule,
        "solar": beat.SolarSchedule, "clocked": beat.ClockedSchedule,
    }[kinds[0]]  # fmt: skip
    if not model.objects.filter(pk=target[kinds[0]]).exists():
        return f"its {kinds[0]} time was deleted"
    spec = specs.by_task_name(target.get("task") or "")
    if spec is None:
        return "its job type is not in the catalogue"
    params = target.get("kwargs")
    cleaned, errors = spec.clean_params(params if isinstance(params, dict) else None)
    if cleaned is None:
        return "its parameters are not valid any more (" + ", ".join(sorted(errors)) + ")"
    headers = target.get("headers")
    if not isinstance(headers, dict) or header_refusal(headers):
        return "its message headers are refused"
    name = target.get("name") or ""
    if beat.PeriodicTask.objects.filter(name=name).exclude(pk=schedule.pk).exists():
        return f"another schedule is now called “{name}”"
    return ""


def _apply_snapshot(schedule, target: dict) -> None:
    for name in SNAPSHOT_FIELDS:
        if name not in target:
            continue
        value = target[name]
        if name in SCHEDULE_KINDS:
            setattr(schedule, f"{name}_id", value)
        elif name in JSON_FIELDS:
            setattr(schedule, name, json.dumps(value))
        elif name in TIME_FIELDS:
            setattr(schedule, name, _parse_time(value) if value else None)
        else:
            setattr(schedule, name, value)
    schedule.args = "[]"


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
