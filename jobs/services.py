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

from jobs.models import Job, JobSource, JobType

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
) -> Job:
    """Store a run as PENDING and publish it to the broker once the transaction commits.

    ``params`` must already be cleaned by the job type's form (``JobSpec.clean_params``).
    With an idempotency key the user's existing run with that key is returned instead.
    Raises PermissionDenied if the user may not run the job type, ValidationError if
    the parameters are too large.
    """
    if not job_type.is_runnable_by(user):
        raise PermissionDenied(f"You may not run “{job_type}”.")
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
            transaction.on_commit(lambda: job_publish(job=job))
    except IntegrityError:
        # The same idempotency key submitted twice at once: the first one won.
        return Job.objects.get(submitted_by=user, idempotency_key=key)
    return job


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
