"""Every write Jobsite makes: submitting and publishing runs.

Views, the API, the admin and tasks call these; they hold no business logic of their own.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from kombu.exceptions import OperationalError

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


def job_publish(*, job: Job) -> bool:
    """Send a stored run to the broker; on a broker fault leave it unsent (False).

    Publishing is bounded (CELERY_BROKER_CONNECTION_TIMEOUT and
    CELERY_TASK_PUBLISH_RETRY_POLICY), so a dead broker never hangs a request.
    """
    from celery import current_app

    options = job.options
    headers = {
        "jobsite_max_retries": options.get("max_retries"),
        "jobsite_retry_backoff": options.get("retry_backoff"),
        "jobsite_retry_backoff_max": options.get("retry_backoff_max"),
    }
    try:
        current_app.send_task(
            job.task_name,
            kwargs=job.params,
            task_id=job.id,
            queue=job.queue or None,
            priority=job.priority,
            eta=job.eta,
            expires=job.expires_at,
            soft_time_limit=options.get("soft_time_limit"),
            time_limit=options.get("time_limit"),
            headers=headers,
            retry=True,
        )
    except BROKER_ERRORS as exc:
        logger.warning("Broker unavailable, run %s stays unsent: %s", job.id, exc)
        return False
    sent_at = timezone.now()
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
