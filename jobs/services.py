"""Every write Jobsite makes: submitting and publishing runs.

Views, the API, the admin and tasks call these; they hold no business logic of their own.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from kombu.exceptions import BatchPublishError, OperationalError

from jobs import catalog, guard
from jobs.models import (
    RETRYABLE_STATES,
    AuditAction,
    AuditEntry,
    AuditOutcome,
    Job,
    JobSource,
    JobState,
    JobType,
)

logger = logging.getLogger(__name__)

# Errors that mean "the broker is unreachable": the run stays stored, unsent.
BROKER_ERRORS = (OperationalError, ConnectionError, OSError, TimeoutError)


def job_submit(
    *,
    job_type: JobType,
    params: dict,
    user,
    options: dict | None = None,
    source: str = JobSource.FORM,
    parent: Job | None = None,
    check_permission: bool = True,
) -> Job:
    """Store a run as PENDING and publish it to the broker once the transaction commits.

    ``params`` must already be cleaned by the job type's form (``JobSpec.clean_params``).
    With an idempotency key the user's existing run with that key is returned instead.
    Raises PermissionDenied if the user may not run the job type, ValidationError if
    the parameters are too large.
    """
    if check_permission and not job_type.is_runnable_by(user):
        raise PermissionDenied(f"You may not run “{job_type}”.")
    if not job_type.enabled:
        raise PermissionDenied(f"“{job_type}” is disabled.")
    _check_size(params)
    options = _effective_options(job_type, options or {})
    options.update(message_options(job_type=job_type, params=params, options=options))
    key = options.pop("idempotency_key", None) or None
    if key:
        existing = Job.objects.filter(submitted_by=user, idempotency_key=key).first()
        if existing:
            return existing
    job = Job(
        id=str(uuid.uuid4()),
        job_type=job_type,
        task_name=job_type.task_name,
        params=params,
        options=options,
        source=source,
        submitted_by=user,
        parent=parent,
        queue=options["queue"],
        priority=options["priority"],
        idempotency_key=key,
        eta=_parse_time(options.get("eta")),
        expires_at=_parse_time(options.get("expires_at")),
    )
    try:
        with transaction.atomic():
            job.save(force_insert=True)
            audit_record(
                actor=user,
                action=AuditAction.SUBMIT,
                target_type="run",
                target_id=job.pk,
                target_repr=str(job_type),
                details={"params": job_type_masked(job_type, params), "source": source},
            )
            transaction.on_commit(lambda: job_publish(job=job))
    except IntegrityError:
        # The same idempotency key submitted twice at once: the first one won.
        return Job.objects.get(submitted_by=user, idempotency_key=key)
    return job


def job_type_masked(job_type: JobType, params: dict) -> dict:
    spec = catalog.get(job_type.name)
    return spec.mask(params) if spec else params


def _check_size(params: dict) -> None:
    size = len(json.dumps(params).encode())
    limit = settings.JOBSITE_MAX_PARAMS_BYTES
    if size > limit:
        raise ValidationError(
            f"The parameters are {size:,} bytes; the limit is {limit:,} bytes.", code="too_large"
        )


def _effective_options(job_type: JobType, given: dict) -> dict:
    """The job type's defaults, overridden by what the submitter chose (already validated)."""
    now = timezone.now()

    def pick(name, default):
        value = given.get(name)
        return default if value is None or value == "" else value

    options = {
        "queue": pick("queue", job_type.queue),
        "priority": pick("priority", job_type.priority),
        "max_retries": pick("max_retries", job_type.max_retries),
        "retry_backoff": job_type.retry_backoff,
        "retry_backoff_max": job_type.retry_backoff_max,
        "soft_time_limit": job_type.soft_time_limit,
        "time_limit": job_type.time_limit,
        "idempotency_key": given.get("idempotency_key"),
    }
    run_at: datetime | None = given.get("run_at")
    countdown = pick("countdown", job_type.countdown)
    if run_at:
        options["eta"] = run_at.isoformat()
    elif countdown:
        options["eta"] = (now + timedelta(seconds=countdown)).isoformat()
    expires = pick("expires", job_type.expires)
    if expires:
        start = run_at or now + timedelta(seconds=countdown or 0)
        options["expires_at"] = (start + timedelta(seconds=expires)).isoformat()
    return options


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class _BrokerBreaker:
    """After a failed publish, skip publishing for a few seconds (per process).

    A dead broker then costs one bounded attempt, not one per request: the runs are
    stored unsent and the relay sends them when the broker is back.
    """

    def __init__(self, pause: float = 5.0) -> None:
        self.pause = pause
        self.open_until = 0.0

    def allows(self) -> bool:
        return time.monotonic() >= self.open_until

    def tripped(self) -> None:
        self.open_until = time.monotonic() + self.pause

    def reset(self) -> None:
        self.open_until = 0.0


broker_breaker = _BrokerBreaker()


def job_publish(*, job: Job, force: bool = False, producer=None, mark_sent: bool = True) -> bool:
    """Send a stored run to the broker; on a broker fault leave it unsent (False).

    Publishing is bounded (CELERY_BROKER_CONNECTION_TIMEOUT and
    CELERY_TASK_PUBLISH_RETRY_POLICY, plus the breaker), so a dead broker never hangs
    a request. ``force`` (the relay) tries even while the breaker is open.
    ``producer`` and ``mark_sent=False`` let a bulk submit publish many runs over one
    producer and store their ``sent_at`` in one UPDATE (``jobs_publish_many``).
    """
    from celery import current_app

    if not force and not broker_breaker.allows():
        logger.info("Broker recently unreachable; run %s stored unsent for the relay", job.id)
        return False
    if job.source == JobSource.WORKFLOW and job.workflow_id:
        return workflow_publish(workflow_id=job.workflow_id, force=force)  # canvas, once
    options = job.options
    headers = {
        # A schedule's own headers (its run-now keeps them), then Jobsite's.
        **options.get("headers", {}),
        **({"periodic_task_name": job.schedule_name} if job.schedule_name else {}),
        "jobsite_max_retries": options.get("max_retries"),
        "jobsite_retry_backoff": options.get("retry_backoff"),
        "jobsite_retry_backoff_max": options.get("retry_backoff_max"),
    }
    try:
        current_app.send_task(
            job.task_name,
            kwargs=job.params,
            task_id=job.id,
            eta=job.eta,
            expires=job.expires_at,
            soft_time_limit=options.get("soft_time_limit"),
            time_limit=options.get("time_limit"),
            retry=True,
            producer=producer,
            # Celery's own logs, inspect output and TaskResult show this, not the kwargs.
            kwargsrepr=repr(job_type_masked(job.job_type, job.params)) if job.job_type else None,
            # queue or exchange + routing key, priority, headers, compression (see Routing)
            **message_kwargs(job=job, headers=headers),
        )
    except BROKER_ERRORS as exc:
        broker_breaker.tripped()
        logger.warning("Broker unavailable, run %s stays unsent: %s", job.id, exc)
        return False
    broker_breaker.reset()
    sent_at = timezone.now()
    if mark_sent:
        Job.objects.filter(pk=job.pk, sent_at__isnull=True).update(sent_at=sent_at)
    job.sent_at = sent_at
    return True


# --- Audit ----------------------------------------------------------------------


def audit_record(
    *,
    actor,
    action: str,
    target_type: str,
    target_id: str,
    target_repr: str = "",
    outcome: str = AuditOutcome.OK,
    details: dict | None = None,
) -> AuditEntry:
    """Record who did what to which target and how it ended (never raises on details)."""
    return AuditEntry.objects.create(
        actor=actor if getattr(actor, "pk", None) else None,
        actor_name=getattr(actor, "username", "") or str(actor or "system"),
        action=action,
        target_type=target_type,
        target_id=str(target_id),
        target_repr=str(target_repr)[:300],
        outcome=outcome,
        details=catalog.to_json(details or {}),
    )


def _audit_job(user, action: str, job: Job, outcome=AuditOutcome.OK, **details) -> None:
    audit_record(
        actor=user,
        action=action,
        target_type="run",
        target_id=job.pk,
        target_repr=str(job.job_type or job.task_name),
        outcome=outcome,
        details=details,
    )


# --- Control: cancel, terminate, retry, rerun, delete ---------------------------


class ActionError(Exception):
    """The action does not apply to this run in its current state (shown to the user)."""


NOT_STARTED = (JobState.PENDING, JobState.RECEIVED, JobState.RETRY)


def _is_now(job: Job) -> str:
    return f"this one is {job.get_state_display().lower()}."


def _check_control(user, job: Job) -> None:
    is_owner = job.submitted_by_id == getattr(user, "pk", None)
    if not (is_owner or user.has_perm("jobs.control_jobs")):
        raise PermissionDenied("You may not control this run.")


def job_cancel(*, job: Job, user) -> Job:
    """Cancel a run that has not started: it will never execute, wherever it is delivered.

    A running job is not touched (use ``job_terminate``).
    """
    _check_control(user, job)
    now = timezone.now()
    updated = Job.objects.filter(pk=job.pk, state__in=NOT_STARTED).update(
        state=JobState.REVOKED, finished_at=now, error_message=f"Cancelled by {user}"
    )
    if not updated:
        job.refresh_from_db()
        _audit_job(user, AuditAction.CANCEL, job, AuditOutcome.FAILED, state=job.state)
        raise ActionError("Only a run that has not started can be cancelled; " + _is_now(job))
    guard.mark_revoked(job.pk)
    _broadcast_revoke(job.pk)
    job.refresh_from_db()
    _audit_job(user, AuditAction.CANCEL, job)
    return job


def job_terminate(*, job: Job, user, grace: int = 10) -> Job:
    """Stop a running job: SIGTERM now, SIGKILL after ``grace`` seconds if still running."""
    _check_control(user, job)
    if job.state not in (JobState.STARTED, JobState.PROGRESS):
        _audit_job(user, AuditAction.TERMINATE, job, AuditOutcome.FAILED, state=job.state)
        raise ActionError("Only a running job can be terminated; " + _is_now(job))
    guard.mark_revoked(job.pk)
    _broadcast_revoke(job.pk, terminate=True, signal="SIGTERM")
    from jobs.tasks import terminate_followup

    try:
        terminate_followup.apply_async(args=[job.pk], countdown=grace, queue="default")
    except BROKER_ERRORS:
        logger.warning("Could not schedule the SIGKILL follow-up for %s", job.pk)
    _audit_job(user, AuditAction.TERMINATE, job, grace=grace)
    return job


def _broadcast_revoke(task_id: str, **kwargs) -> None:
    from celery import current_app

    try:
        current_app.control.revoke(task_id, **kwargs)
    except BROKER_ERRORS as exc:
        # The Redis marker still stops the run; only the in-memory revoke was missed.
        logger.warning("Could not broadcast revoke of %s: %s", task_id, exc)


def job_retry(*, job: Job, user) -> Job:
    """A new run with the same parameters and options, linked to the original."""
    _check_control(user, job)
    if job.state not in RETRYABLE_STATES:
        raise ActionError("Only a failed, cancelled or lost run can be retried; " + _is_now(job))
    if job.job_type is None:
        raise ActionError("This run's task is not in the catalogue, so it cannot be sent again.")
    new = _resubmit(job=job, user=user, params=job.params, source=JobSource.RETRY)
    _audit_job(user, AuditAction.RETRY, job, new_run=new.pk)
    return new


def job_rerun(*, job: Job, user, params: dict, options: dict | None = None) -> Job:
    """A new run with edited (already validated) parameters; the lineage is kept."""
    _check_control(user, job)
    if job.job_type is None:
        raise ActionError("This run's task is not in the catalogue, so it cannot be sent again.")
    new = job_submit(
        job_type=job.job_type,
        params=params,
        user=user,
        options=options,
        source=JobSource.RERUN,
        parent=job,
    )
    _audit_job(user, AuditAction.RERUN, job, new_run=new.pk)
    return new


def _resubmit(*, job: Job, user, params: dict, source: str) -> Job:
    options = {
        "queue": job.options.get("queue"),
        "priority": job.options.get("priority"),
        "max_retries": job.options.get("max_retries"),
    }
    # An operator may retry a run of a job type they may not submit themselves.
    return job_submit(
        job_type=job.job_type,
        params=params,
        user=user,
        options=options,
        source=source,
        parent=job,
        check_permission=not user.has_perm("jobs.control_jobs"),
    )


def job_delete(*, job: Job, user) -> None:
    _check_control(user, job)
    if not job.is_finished:
        raise ActionError("Only a finished run can be deleted; cancel it first.")
    _audit_job(user, AuditAction.DELETE, job, task_name=job.task_name, state=job.state)
    job.delete()


BULK_ACTIONS = {"cancel": job_cancel, "retry": job_retry, "delete": job_delete}


def job_bulk(*, action: str, jobs, user) -> tuple[int, list[str]]:
    """Apply one action to many runs; returns (how many succeeded, error messages)."""
    func = BULK_ACTIONS[action]
    done, errors = 0, []
    for job in jobs:
        try:
            func(job=job, user=user)
        except (ActionError, PermissionDenied) as exc:
            errors.append(f"{job.pk}: {exc}")
        else:
            done += 1
    return done, errors


# --- Workers and queues -----------------------------------------------------------

PAUSED_QUEUES_KEY = "jobsite:paused_queues"


def _check_manage(user) -> None:
    if not user.has_perm("jobs.manage_workers"):
        raise PermissionDenied("You may not control workers and queues.")


def _control_reply(action: str, user, target_type: str, target: str, call, **details):
    """Run one remote-control call, audit it with its outcome, and return the replies."""
    try:
        replies = call()
    except BROKER_ERRORS as exc:
        audit_record(
            actor=user, action=action, target_type=target_type, target_id=target,
            outcome=AuditOutcome.FAILED, details={**details, "error": str(exc)},
        )  # fmt: skip
        raise ActionError(f"The broker could not be reached: {exc}") from exc
    audit_record(
        actor=user, action=action, target_type=target_type, target_id=target,
        details={**details, "replies": replies or []},
    )  # fmt: skip
    return replies or []


def queue_set_paused(*, queue: str, paused: bool, user) -> list:
    """Pause: every worker stops consuming ``queue`` (its runs wait, visible in its depth).

    Resume: every worker consumes it again. The paused set lives in Redis so that a
    worker starting later skips a paused queue too (jobs.signals.on_worker_ready).
    """
    from celery import current_app

    _check_manage(user)
    control = current_app.control
    if paused:
        guard.client().sadd(PAUSED_QUEUES_KEY, queue)
        action, call = AuditAction.PAUSE, control.cancel_consumer
    else:
        guard.client().srem(PAUSED_QUEUES_KEY, queue)
        action, call = AuditAction.RESUME, control.add_consumer
    return _control_reply(action, user, "queue", queue, lambda: call(queue, reply=True, timeout=2))


def queues_paused() -> set[str]:
    try:
        return {q.decode() for q in guard.client().smembers(PAUSED_QUEUES_KEY)}
    except Exception:  # Redis down: nothing known to be paused
        return set()


def queue_purge(*, queue: str, user) -> int:
    """Delete every message waiting in ``queue`` (superusers only); their runs become cancelled."""
    from celery import current_app

    if not user.is_superuser:
        raise PermissionDenied("Only a superuser may purge a queue.")
    try:
        with current_app.connection_for_write() as conn:
            purged = conn.default_channel.queue_purge(queue) or 0
    except BROKER_ERRORS as exc:
        audit_record(actor=user, action=AuditAction.PURGE, target_type="queue", target_id=queue,
                     outcome=AuditOutcome.FAILED, details={"error": str(exc)})  # fmt: skip
        raise ActionError(f"The broker could not be reached: {exc}") from exc
    cancelled = Job.objects.filter(
        queue=queue, state=JobState.PENDING, sent_at__isnull=False
    ).update(
        state=JobState.REVOKED, finished_at=timezone.now(), error_message=f"Queue purged by {user}"
    )
    audit_record(actor=user, action=AuditAction.PURGE, target_type="queue", target_id=queue,
                 details={"messages": purged, "runs_cancelled": cancelled})  # fmt: skip
    return purged


WORKER_ACTIONS = {
    "pool_grow": AuditAction.POOL_GROW,
    "pool_shrink": AuditAction.POOL_SHRINK,
    "consumer_add": AuditAction.CONSUMER_ADD,
    "consumer_cancel": AuditAction.CONSUMER_CANCEL,
    "shutdown": AuditAction.SHUTDOWN,
}


def worker_control(*, worker: str, action: str, user, queue: str = "", n: int = 1) -> list:
    """Pool grow/shrink, add/cancel a queue consumer, or shut down (superuser) one worker."""
    from celery import current_app

    _check_manage(user)
    if action == "shutdown" and not user.is_superuser:
        raise PermissionDenied("Only a superuser may shut a worker down.")
    control = current_app.control
    dest = [worker]
    calls = {
        "pool_grow": lambda: control.pool_grow(n, destination=dest, reply=True, timeout=2),
        "pool_shrink": lambda: control.pool_shrink(n, destination=dest, reply=True, timeout=2),
        "consumer_add": lambda: control.add_consumer(
            queue, destination=dest, reply=True, timeout=2
        ),
        "consumer_cancel": lambda: control.cancel_consumer(
            queue, destination=dest, reply=True, timeout=2
        ),
        "shutdown": lambda: control.shutdown(destination=dest, reply=True, timeout=2),
    }
    if action not in calls:
        raise ActionError(f"Unknown worker action {action!r}.")
    return _control_reply(
        WORKER_ACTIONS[action], user, "worker", worker, calls[action], queue=queue, n=n
    )


# --- API tokens -------------------------------------------------------------------
# Imports are local so this block stays self-contained in a file several people edit.


def api_token_hash(secret: str) -> str:
    """The SHA-256 of a token's secret: the only form in which it is stored."""
    import hashlib

    return hashlib.sha256(secret.encode()).hexdigest()


def api_token_create(*, user, name: str, actor=None):
    """A new token for ``user``; returns (token, secret). The secret is never stored.

    ``actor`` is who made it (a staff member in the admin); by default the user.
    """
    import secrets

    from jobs.models import ApiToken

    secret = secrets.token_urlsafe(32)
    with transaction.atomic():
        token = ApiToken.objects.create(
            user=user, name=name, prefix=secret[:8], key_hash=api_token_hash(secret)
        )
        _audit_token(actor or user, AuditAction.TOKEN_CREATE, token)
    return token, secret


def api_token_revoke(*, token, user):
    """Revoke a token (its owner, or staff with ``jobs.change_apitoken``); it is kept, refused."""
    from jobs.models import ApiToken

    if token.user_id != user.pk and not user.has_perm("jobs.change_apitoken"):
        raise PermissionDenied("You may not revoke this token.")
    now = timezone.now()
    with transaction.atomic():
        # Conditional, so that two revokes at once record one revocation.
        active = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True)
        updated = active.update(revoked_at=now)
        if not updated:
            raise ActionError("This token is already revoked.")
        token.revoked_at = now
        _audit_token(user, AuditAction.TOKEN_REVOKE, token)
    return token


def _audit_token(actor, action: str, token) -> None:
    audit_record(
        actor=actor,
        action=action,
        target_type="api_token",
        target_id=token.pk,
        target_repr=str(token),
        details={"owner": token.user.get_username(), "prefix": token.prefix},
    )


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
    fields = {"enabled": True} if enabled else {"enabled": False, "last_run_at": None}
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
    schedule's task is not catalogued, its job type is disabled, its parameters are no
    longer valid, or it has expired.
    """
    job_type, params = _schedule_job_type_and_params(schedule)
    job = Job(
        id=str(uuid.uuid4()),
        job_type=job_type,
        task_name=job_type.task_name,
        params=params,
        options=_schedule_options(schedule, job_type),
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
    spec = catalog.by_task_name(schedule.task)
    job_type = JobType.objects.filter(name=spec.name).first() if spec else None
    if job_type is None:
        raise ActionError(f"“{schedule.name}” runs {schedule.task}, which is not in the catalogue.")
    if not job_type.enabled:
        raise ActionError(f"“{job_type}” is disabled.")
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


# --- Alerts ---------------------------------------------------------------------


def alert_raise(*, rule, kind: str, subject: str, payload: dict, job: Job | None = None, now=None):
    """Record an alert for a rule, or fold it into the rule's last alert of that kind.

    Within ``rule.min_interval`` seconds of the last alert of the same kind, nothing new
    is recorded (or sent): the last one's ``suppressed`` count goes up and None is
    returned. Otherwise a new Alert is stored, its payload saying how many were folded
    into the previous one. The row lock keeps two concurrent checks from both sending.
    """
    from django.db.models import F

    from jobs.models import Alert

    now = now or timezone.now()
    with transaction.atomic():
        type(rule).objects.select_for_update().filter(pk=rule.pk).first()
        last = rule.alerts.filter(kind=kind).order_by("-created_at", "-id").first()
        if last and last.created_at > now - timedelta(seconds=rule.min_interval):
            Alert.objects.filter(pk=last.pk).update(suppressed=F("suppressed") + 1)
            return None
        payload = {**payload, "folded_into_previous": last.suppressed if last else 0}
        return Alert.objects.create(
            rule=rule, kind=kind, job=job, subject=subject[:300], payload=payload, created_at=now
        )


def alert_record_delivery(*, alert, email_sent: bool, webhook_status: str, error: str) -> None:
    alert.email_sent = email_sent
    alert.webhook_status = webhook_status[:100]
    alert.error = error
    alert.save(update_fields=["email_sent", "webhook_status", "error"])


# --- Relay: publishing runs stored while the broker was down ------------------------


def jobs_relay(*, batch: int = 200, min_age: float = 10.0, limit: int = 10_000) -> int:
    """Publish unsent runs, oldest first; returns how many were sent.

    Rows are locked with ``SELECT … FOR UPDATE SKIP LOCKED`` (PostgreSQL), so two relays
    running at once never send the same run twice; runs younger than ``min_age`` are
    left to the request that stored them (its on-commit publish may still be under way).
    Stops at the first broker fault: the rest waits for the next relay.
    """
    sent = 0
    cutoff = timezone.now() - timedelta(seconds=min_age)
    while sent < limit:
        with transaction.atomic():
            rows = list(
                Job.objects.unsent()
                .filter(created_at__lte=cutoff)
                .order_by("created_at")
                .select_for_update(skip_locked=True)[:batch]
            )
            if not rows:
                return sent
            for job in rows:
                if not job_publish(job=job, force=True):
                    return sent
                sent += 1
    return sent


# --- Stale runs and retention -------------------------------------------------------


def jobs_mark_lost(*, lost_after: int | None = None) -> int:
    """Mark LOST the runs whose worker has sent no heartbeat for ``lost_after`` seconds.

    A LOST run can be retried; if its message is redelivered (acks_late) and it runs
    again, the worker's next transition brings it back from LOST.
    """
    from jobs import heartbeat

    lost_after = lost_after or settings.JOBSITE_LOST_AFTER
    now = timezone.now()
    cutoff = now - timedelta(seconds=lost_after)
    active = Job.objects.filter(
        Q(received_at__lt=cutoff) | Q(started_at__lt=cutoff),
        state__in=[JobState.RECEIVED, JobState.STARTED, JobState.PROGRESS],
    ).exclude(worker="")
    workers = sorted(set(active.values_list("worker", flat=True)))
    seen = heartbeat.worker_last_seen(workers)
    silent = [name for name in workers if (seen.get(name) or cutoff) <= cutoff]
    if not silent:
        return 0
    count = active.filter(worker__in=silent).update(
        state=JobState.LOST,
        finished_at=now,
        error_message=f"The worker stopped sending heartbeats for over {lost_after} s.",
    )
    audit_record(actor=None, action=AuditAction.RUNS_LOST, target_type="worker",
                 target_id=",".join(silent), details={"runs": count})  # fmt: skip
    return count


def jobs_expire(*, grace: int = 60) -> int:
    """Mark cancelled the runs whose expiry passed before they started.

    A worker that receives an expired message records it as revoked, but RabbitMQ may
    drop it first (message TTL) and then no worker ever sees it: without this, such a
    run would stay pending for ever.
    """
    now = timezone.now()
    return Job.objects.filter(
        state__in=[JobState.PENDING, JobState.RECEIVED],
        expires_at__lt=now - timedelta(seconds=grace),
    ).update(state=JobState.REVOKED, finished_at=now, error_message="Expired before it started.")


def jobs_cleanup(*, batch: int = 5000, now=None) -> dict[str, int]:
    """Delete runs (with their logs) and Celery result rows past their retention.

    Works in batches, each in its own short transaction, selecting ids through the
    created_at index: memory stays bounded by the batch size and no lock is held for
    long, however many rows are due (the problem django-celery-results' own cleanup has
    with a single huge DELETE).
    """
    from django_celery_results.models import TaskResult

    now = now or timezone.now()
    deleted = {"runs": 0, "task_results": 0}
    for job_types, days in _retention_groups():
        queryset = Job.objects.filter(created_at__lt=now - timedelta(days=days))
        queryset = (
            queryset.filter(job_type__in=job_types)
            if job_types
            else queryset.exclude(job_type__retention_days__isnull=False)
        )
        while ids := list(queryset.order_by("created_at").values_list("pk", flat=True)[:batch]):
            with transaction.atomic():
                _delete_runs(ids)
                deleted["task_results"] += TaskResult.objects.filter(task_id__in=ids).delete()[0]
            deleted["runs"] += len(ids)
    cutoff = now - timedelta(days=settings.JOBSITE_RETENTION_DAYS)
    results = TaskResult.objects.filter(date_done__lt=cutoff)
    while ids := list(results.values_list("pk", flat=True)[:batch]):
        deleted["task_results"] += TaskResult.objects.filter(pk__in=ids).delete()[0]
    return deleted


def _retention_groups() -> list[tuple[list[int], int]]:
    """[(job type ids, days)]: one group per override, then everything else ([])."""
    overrides: dict[int, list[int]] = {}
    for pk, days in JobType.objects.filter(retention_days__isnull=False).values_list(
        "pk", "retention_days"
    ):
        overrides.setdefault(days, []).append(pk)
    return [(pks, days) for days, pks in overrides.items()] + [
        ([], settings.JOBSITE_RETENTION_DAYS)
    ]


def _delete_runs(ids: list[str]) -> None:
    from jobs.models import Alert, JobLog

    JobLog.objects.filter(job_id__in=ids).delete()
    Job.objects.filter(parent_id__in=ids).update(parent=None)
    Alert.objects.filter(job_id__in=ids).update(job=None)
    # Relations are cleared above, so a plain DELETE is safe; Django's collector would
    # load every row (and its relations) into memory first.
    Job.objects.filter(pk__in=ids)._raw_delete(Job.objects.db)


# --- Routing, message options and workflows -----------------------------------------


def message_options(*, job_type: JobType, params: dict, options: dict) -> dict:
    """What a run's job type declares about its messages, stored in Job.options.

    Its route (exchange, type, routing key, headers and the queues it reaches), rate
    limit, compression and serializer: shown on the run's page. Raises ValidationError
    for a route the broker cannot deliver (headers on Redis, or no queue bound).
    """
    from celery import current_app

    from jobs import routing

    conf = current_app.conf
    spec = catalog.get(job_type.name)
    extra = {"serializer": conf.task_serializer, "compression": conf.task_compression}
    if spec is None:
        return extra
    if spec.route:
        extra.update(routing.route_options(spec.route, params, conf.broker_url))
    else:
        # Celery publishes direct routes through the AMQP default exchange ("").
        extra.update(exchange="", exchange_type="direct", routing_key=options["queue"])
    for name in ("rate_limit", "compression"):
        if spec.task_options.get(name):
            extra[name] = spec.task_options[name]
    return extra


def message_kwargs(*, job: Job, headers: dict) -> dict:
    """``send_task`` routing arguments for a stored run (queue or exchange + key)."""
    from celery import current_app

    from jobs import routing

    options = job.options
    kwargs = {
        # The setting, not the task class's copy of it (taken when the task was bound).
        "serializer": current_app.conf.task_serializer,
        "priority": routing.wire_priority(job.priority, current_app.conf.broker_url),
        "headers": {**headers, **options.get("route_headers", {})},
    }
    if options.get("route"):
        kwargs.update(routing.publish_kwargs(options))
    else:
        kwargs["queue"] = job.queue or None
        # A schedule may name its exchange and routing key (django-celery-beat fields).
        kwargs.update({k: options[k] for k in ("exchange", "routing_key") if options.get(k)})
    if options.get("compression"):
        kwargs["compression"] = options["compression"]
    return kwargs


def workflow_submit(*, workflow: str, params: dict, user, source: str = JobSource.FORM) -> Job:
    """Store every step of a workflow as a PENDING run, then publish it as one canvas.

    ``params`` are cleaned by the template's form. Each step's parameters are checked
    again by its job type's form. Returns the root run: the first step, whose id is
    the workflow id (every step's ``workflow_id``; Celery's ``root_id``). Raises
    ValidationError (unknown template, invalid step) or PermissionDenied (a job type
    the user may not run).
    """
    from jobs import workflows

    template = workflows.get(workflow)
    if template is None:
        raise ValidationError(f"There is no workflow {workflow!r}.", code="unknown")
    params = catalog.to_json(params)
    plan = template.build(params)
    jobs = _workflow_jobs(plan, user)
    root = jobs[0]
    root.options["workflow"].update(
        name=template.name, title=template.title, shape=template.shape, plan=plan,
        params=params, source=source,
    )  # fmt: skip
    with transaction.atomic():
        Job.objects.bulk_create(jobs)
        audit_record(
            actor=user, action=AuditAction.SUBMIT, target_type="workflow", target_id=root.pk,
            target_repr=template.title, details={"params": params, "steps": [j.pk for j in jobs]},
        )  # fmt: skip
        transaction.on_commit(lambda: workflow_publish(workflow_id=root.pk))
    return root


def _workflow_jobs(plan: dict, user) -> list[Job]:
    """One unsaved PENDING Job per step; gives each plan step its run id."""
    from jobs import workflows

    nodes = list(workflows.steps(plan))
    for node in nodes:
        node["id"] = str(uuid.uuid4())
    workflow_id = nodes[0]["id"]
    links = workflows.parents(plan)
    job_types = _workflow_job_types({node["job_type"] for node in nodes}, user)
    jobs = []
    for node in nodes:
        job_type = job_types[node["job_type"]]
        params, errors = catalog.get(job_type.name).clean_params(node.pop("params"))
        if params is None:
            raise ValidationError(f"Step “{node['label']}” is invalid: {errors}", code="invalid")
        _check_size(params)
        options = _effective_options(job_type, {})
        for unused in ("idempotency_key", "eta"):  # steps start when their turn comes
            options.pop(unused, None)
        options.update(message_options(job_type=job_type, params=params, options=options))
        options["workflow"] = {"id": workflow_id, "label": node["label"],
                               "parents": links[node["id"]]}  # fmt: skip
        job = Job(
            id=node["id"], job_type=job_type, task_name=job_type.task_name, params=params,
            options=options, source=JobSource.WORKFLOW, submitted_by=user,
            workflow_id=workflow_id, queue=options["queue"], priority=options["priority"],
            expires_at=_parse_time(options.get("expires_at")),
        )  # fmt: skip
        jobs.append(job)
    return jobs


def _workflow_job_types(names: set[str], user) -> dict[str, JobType]:
    found = {jt.name: jt for jt in JobType.objects.filter(name__in=names)}
    for name in sorted(names):
        job_type = found.get(name)
        if job_type is None or catalog.get(name) is None:
            raise ValidationError(f"The job type {name!r} is not in the catalogue.")
        if not job_type.enabled:
            raise PermissionDenied(f"“{job_type}” is disabled.")
        if not job_type.is_runnable_by(user):
            raise PermissionDenied(f"You may not run “{job_type}”, a step of this workflow.")
    return found


def workflow_publish(*, workflow_id: str, force: bool = False) -> bool:
    """Publish a stored workflow's canvas once (the submit, or the relay); False if the
    broker is unreachable (every step stays unsent, for the relay)."""
    from jobs import workflows

    if not force and not broker_breaker.allows():
        logger.info("Broker recently unreachable; workflow %s stored unsent", workflow_id)
        return False
    with transaction.atomic():
        root = Job.objects.select_for_update().filter(pk=workflow_id, sent_at__isnull=True).first()
        if root is None:
            return True  # already published: the relay meets every step of it
        runs = {job.pk: job for job in Job.objects.filter(workflow_id=workflow_id)}
        canvas = workflows.to_canvas(
            root.options["workflow"]["plan"],
            lambda node: _step_signature(runs[node["id"]], node, workflow_id),
        )
        workflows.link_error(canvas, _errback_signature(workflow_id))
        try:
            canvas.apply_async()
        except BROKER_ERRORS as exc:
            broker_breaker.tripped()
            logger.warning("Broker unavailable, workflow %s stays unsent: %s", workflow_id, exc)
            return False
        broker_breaker.reset()
        # The later steps travel inside the first messages (chain and chord options).
        Job.objects.filter(workflow_id=workflow_id, sent_at__isnull=True).update(
            sent_at=timezone.now()
        )
    return True


def _step_signature(job: Job, node: dict, workflow_id: str):
    from celery import signature

    options = job.options
    headers = {
        # A schedule's own headers (its run-now keeps them), then Jobsite's.
        **options.get("headers", {}),
        **({"periodic_task_name": job.schedule_name} if job.schedule_name else {}),
        "jobsite_max_retries": options.get("max_retries"),
        "jobsite_retry_backoff": options.get("retry_backoff"),
        "jobsite_retry_backoff_max": options.get("retry_backoff_max"),
    }
    route = message_kwargs(job=job, headers=headers)
    route.pop("declare", None)  # entities cannot travel inside a chain message
    return signature(
        job.task_name,
        kwargs=job.params,
        immutable=not node["takes_result"],
        task_id=job.pk,
        root_id=workflow_id,
        expires=options.get("expires_at"),
        soft_time_limit=options.get("soft_time_limit"),
        time_limit=options.get("time_limit"),
        **route,
    )


def _errback_signature(workflow_id: str):
    from celery import current_app, signature

    from jobs import routing

    return signature(
        "jobs.workflow_failed",
        kwargs={"workflow_id": workflow_id},
        queue="default",
        root_id=workflow_id,
        priority=routing.wire_priority(9, current_app.conf.broker_url),
    )


def workflow_record_failure(*, workflow_id: str, failed_task_id: str | None, errback_id: str):
    """The errback's work: find the failed step, mark the steps that can no longer run
    as not run, link the errback's own run to the workflow; returns its result."""
    from jobs import workflows

    root = Job.objects.filter(pk=workflow_id).first()
    if root is None:
        return {"workflow": workflow_id, "failed_step": failed_task_id, "note": "unknown"}
    failed = _failed_step(workflow_id, failed_task_id)
    plan = root.options.get("workflow", {}).get("plan")
    not_run = sorted(workflows.downstream(plan, failed.pk)) if plan and failed else []
    now = timezone.now()
    # Celery also stores the failure on the chain's later steps; they never started.
    Job.objects.filter(
        pk__in=not_run, state__in=[JobState.PENDING, JobState.FAILURE], started_at__isnull=True
    ).update(
        state=JobState.REVOKED, finished_at=now, exception_type="", traceback="",
        error_message=f"Not run: the step {failed.pk if failed else '?'} failed.",
    )  # fmt: skip
    for pk in not_run:
        guard.mark_revoked(pk)  # should its message still arrive, it is skipped
    # The worker recorded this errback run on first sight, with nobody as submitter.
    Job.objects.filter(pk=errback_id).update(
        workflow_id=workflow_id, source=JobSource.WORKFLOW, submitted_by=root.submitted_by_id
    )
    result = {
        "workflow": workflow_id,
        "failed_step": failed.pk if failed else failed_task_id,
        "step": failed.options.get("workflow", {}).get("label", "") if failed else "",
        "error": f"{failed.exception_type}: {failed.error_message}" if failed else "",
        "not_run": not_run,
    }
    root.options["workflow"]["failure"] = result
    Job.objects.filter(pk=root.pk).update(options=root.options)
    return result


def _failed_step(workflow_id: str, failed_task_id: str | None) -> Job | None:
    """The step that failed: a chord's callback fails with ChordError when one of its
    group did, and the errback is then told about the callback, not the culprit."""
    failures = (
        Job.objects.filter(
            workflow_id=workflow_id, state=JobState.FAILURE, started_at__isnull=False
        )
        .exclude(exception_type="ChordError")
        .exclude(task_name="jobs.workflow_failed")
    )
    named = failures.filter(pk=failed_task_id).first() if failed_task_id else None
    return named or failures.order_by("finished_at").first()


def workflow_cancel(*, root: Job, user) -> tuple[list[str], list[str]]:
    """Cancel every unfinished step (``job_cancel``); returns (cancelled ids, errors).

    A step already running is not stopped (terminate it from its page); the steps
    after it are cancelled, so the workflow goes no further.
    """
    from jobs.models import FINISHED_STATES

    _check_control(user, root)
    steps = Job.objects.filter(workflow_id=root.pk).exclude(state__in=FINISHED_STATES)
    cancelled, errors = [], []
    for step in steps.order_by("created_at", "id"):
        try:
            job_cancel(job=step, user=user)
        except (ActionError, PermissionDenied) as exc:
            errors.append(f"{step.options.get('workflow', {}).get('label', step.pk)}: {exc}")
        else:
            cancelled.append(step.pk)
    audit_record(
        actor=user, action=AuditAction.CANCEL, target_type="workflow", target_id=root.pk,
        target_repr=root.options.get("workflow", {}).get("title", ""),
        details={"cancelled": cancelled, "not_cancelled": errors},
    )  # fmt: skip
    return cancelled, errors


def broadcast_record(
    *, job_id: str, hostname: str, result: dict | None, error: str = ""
) -> Job | None:
    """Record one worker's copy of a broadcast run as the child run ``<id>:<hostname>``.

    Every worker receives the same task id from the fanout exchange; the run keeps
    the last state any of them stored, and each child keeps one worker's.
    """
    parent = Job.objects.filter(pk=job_id).first()
    if parent is None:
        return None
    now = timezone.now()
    child, _ = Job.objects.get_or_create(
        pk=f"{job_id}:{hostname}"[:255],
        defaults={
            "job_type_id": parent.job_type_id, "task_name": parent.task_name,
            "params": parent.params, "options": {**parent.options, "broadcast_of": job_id},
            "source": parent.source, "submitted_by_id": parent.submitted_by_id,
            "workflow_id": job_id, "queue": parent.queue, "priority": parent.priority,
            "sent_at": parent.sent_at or now, "received_at": now,
        },
    )  # fmt: skip
    if result is None and not error:
        fields = {"state": JobState.STARTED, "started_at": now, "worker": hostname}
    elif error:
        fields = {"state": JobState.FAILURE, "finished_at": now, "error_message": error}
    else:
        fields = {"state": JobState.SUCCESS, "finished_at": now, "result": result}
    Job.objects.filter(pk=child.pk).update(**fields)
    return child


# --- Bulk submit (POST /api/runs/bulk/) -----------------------------------------------

BULK_SUBMIT_MAX = 1000


class BulkSubmitError(Exception):
    """Some items of a bulk submit were refused: ``errors`` is {index: {field: [messages]}}."""

    def __init__(self, errors: dict[int, dict]) -> None:
        super().__init__(f"{len(errors)} item(s) refused")
        self.errors = errors


def job_submit_many(
    *, items: list[tuple[JobType, dict, dict]], user, source: str = JobSource.API
) -> list[Job]:
    """Store many runs at once (all or none), then publish them after the commit.

    ``items`` are (job type, cleaned params, cleaned options), as for ``job_submit``.
    One INSERT for the runs and one for their audit entries, and publishing over the
    producer pool's one connection, make a thousand runs cost about what a few single
    submits do. Raises BulkSubmitError listing every refused item; nothing is stored then.
    """
    errors = _bulk_errors(items, user)
    if errors:
        raise BulkSubmitError(errors)
    jobs = [
        _bulk_job(job_type, params, options, user, source) for job_type, params, options in items
    ]
    entries = [
        AuditEntry(
            actor=user, actor_name=user.username, action=AuditAction.SUBMIT, target_type="run",
            target_id=job.pk, target_repr=str(job.job_type)[:300],
            details={"params": job_type_masked(job.job_type, job.params), "source": source},
        )
        for job in jobs
    ]  # fmt: skip
    with transaction.atomic():
        Job.objects.bulk_create(jobs)
        AuditEntry.objects.bulk_create(entries)
        transaction.on_commit(lambda: jobs_publish_many(jobs=jobs))
    return jobs


def _bulk_errors(items, user) -> dict[int, dict]:
    allowed: dict[int, str | None] = {}  # job type id -> why not (None: runnable)
    errors: dict[int, dict] = {}
    for index, (job_type, params, options) in enumerate(items):
        if job_type.pk not in allowed:
            allowed[job_type.pk] = (
                f"“{job_type}” is disabled." if not job_type.enabled
                else None if job_type.is_runnable_by(user)
                else f"You may not run “{job_type}”."
            )  # fmt: skip
        item: dict = {}
        if allowed[job_type.pk]:
            item["job_type"] = [allowed[job_type.pk]]
        try:
            _check_size(params)
        except ValidationError as exc:
            item["params"] = exc.messages
        if options.get("idempotency_key"):
            item["options"] = {"idempotency_key": ["Not accepted in a bulk submit."]}
        if item:
            errors[index] = item
    return errors


def _bulk_job(job_type: JobType, params: dict, options: dict, user, source: str) -> Job:
    options = _effective_options(job_type, options)
    options.update(message_options(job_type=job_type, params=params, options=options))
    options.pop("idempotency_key", None)
    return Job(
        id=str(uuid.uuid4()), job_type=job_type, task_name=job_type.task_name, params=params,
        options=options, source=source, submitted_by=user, queue=options["queue"],
        priority=options["priority"], eta=_parse_time(options.get("eta")),
        expires_at=_parse_time(options.get("expires_at")),
    )  # fmt: skip


# Redis commands a message may take in a publish batch: its LPUSH, and a PEXPIRE per
# priority step when its queue expires.
_BATCH_ROOM = 12


def jobs_publish_many(*, jobs: list[Job]) -> int:
    """Publish stored runs over one producer, then mark them sent in one UPDATE.

    Returns how many were sent. Runs left unsent by a broker fault are published
    later by the relay, as for a single submit. (A fault while the batch is sent may
    leave some of it sent: the relay then sends those again, as when a single publish
    times out after the broker took it.)
    """
    from celery import current_app

    with current_app.producer_or_acquire() as producer:
        faults = (*BROKER_ERRORS, *producer.connection.connection_errors, BatchPublishError)
        try:
            # On Redis, kombu buffers the batch's messages and sends them in one
            # pipeline when the batch ends (other transports publish one by one).
            # Room for all of them: no flush midway, whose fault would leave the runs
            # before it counted as sent.
            with producer.batch(max_size=_BATCH_ROOM * len(jobs) + 1):
                sent = [
                    job for job in jobs if job_publish(job=job, producer=producer, mark_sent=False)
                ]
        except faults as exc:
            broker_breaker.tripped()
            logger.warning("Broker unavailable, %d runs stay unsent: %s", len(jobs), exc)
            for job in jobs:
                job.sent_at = None  # job_publish noted them sent when it buffered them
            return 0
    if sent:
        Job.objects.filter(pk__in=[job.pk for job in sent], sent_at__isnull=True).update(
            sent_at=sent[-1].sent_at
        )
    return len(sent)
