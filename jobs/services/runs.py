"""Submitting and publishing runs: one, many, and the message each becomes."""

from __future__ import annotations

import contextlib
import logging
import uuid
from datetime import timedelta

from celery import current_app
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models.sql import InsertQuery
from django.utils import timezone
from kombu.exceptions import BatchPublishError  # type: ignore[attr-defined]  # kombu-stubs lack it

from jobs import routing, specs
from jobs.models import (
    AuditAction,
    AuditEntry,
    Job,
    JobSource,
    JobType,
)
from jobs.services.errors import BROKER_ERRORS
from jobs.services.messages import (
    _check_size,
    _effective_options,
    _parse_time,
    broker_breaker,
    message_kwargs,
    message_options,
)
from jobs.services.workflows import workflow_publish

logger = logging.getLogger(__name__)


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
    Raises PermissionDenied if the user may not run the job type (or no one may: an
    internal one), ValidationError if
    the parameters are too large.
    """
    refusal = job_type.submit_refusal(user, check_permission=check_permission)
    if refusal:
        raise PermissionDenied(refusal)
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
    entry = AuditEntry(
        actor=user if getattr(user, "pk", None) else None,
        actor_name=getattr(user, "username", "") or str(user or "system"),
        action=AuditAction.SUBMIT, target_type="run",
        target_id=job.pk, target_repr=str(job_type)[:300],
        details=specs.to_json({"params": job_type_masked(job_type, params), "source": source}),
    )  # fmt: skip
    try:
        # Outside a transaction, the run and its audit entry are one statement (atomic
        # on its own: no BEGIN and COMMIT round trips); inside one, a savepoint keeps an
        # idempotency-key clash from breaking the caller's transaction.
        with transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext():
            _insert_together(job, entry)
            transaction.on_commit(lambda: job_publish(job=job))
    except IntegrityError:
        # The same idempotency key submitted twice at once: the first one won.
        return Job.objects.get(submitted_by=user, idempotency_key=key)
    return job


def _insert_together(*objs) -> None:
    """INSERT each model instance, in one statement: ``WITH a AS (INSERT ...) INSERT ...``."""
    parts, params = [], []
    for obj in objs:
        fields = [f for f in obj._meta.local_concrete_fields
                  if not (f.primary_key and getattr(obj, f.attname) is None)]  # fmt: skip
        query = InsertQuery(type(obj))
        query.insert_values(fields, [obj])
        [(sql, values)] = query.get_compiler(connection=connection).as_sql()
        parts.append(sql)
        params.extend(values)
    *first, last = parts
    ctes = ", ".join(f"i{n} AS ({sql})" for n, sql in enumerate(first))
    with connection.cursor() as cursor:
        cursor.execute(f"WITH {ctes} {last}" if ctes else last, params)
    for obj in objs:
        obj._state.adding, obj._state.db = False, connection.alias


def job_type_masked(job_type: JobType, params: dict) -> dict:
    spec = specs.get(job_type.name)
    return spec.mask(params) if spec else params


def job_publish(*, job: Job, force: bool = False, producer=None, mark_sent: bool = True) -> bool:
    """Send a stored run to the broker; on a broker fault leave it unsent (False).

    Publishing is bounded (CELERY_BROKER_CONNECTION_TIMEOUT and
    CELERY_TASK_PUBLISH_RETRY_POLICY, plus the breaker), so a dead broker never hangs
    a request. ``force`` (the relay) tries even while the breaker is open.
    ``producer`` and ``mark_sent=False`` let a bulk submit publish many runs over one
    producer and store their ``sent_at`` in one UPDATE (``jobs_publish_many``).
    """

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
            eta=_publishable_eta(job.eta),
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


# --- Routing, message options and workflows -----------------------------------------


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
            actor=user if getattr(user, "pk", None) else None,
        actor_name=getattr(user, "username", "") or str(user or "system"),
        action=AuditAction.SUBMIT, target_type="run",
            target_id=job.pk, target_repr=str(job.job_type)[:300],
            details={"params": job_type_masked(job_type, job.params), "source": source},
        )
        for job, (job_type, _, _) in zip(jobs, items, strict=True)
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
            allowed[job_type.pk] = job_type.submit_refusal(user)
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


def _publishable_eta(eta):
    """The run's ETA, at least a second ahead on quorum queues (routing.native_delay)."""
    if eta is None or not routing.uses_quorum(current_app.conf.task_queues or ()):
        return eta
    now = timezone.now()
    return now + timedelta(seconds=routing.native_delay((eta - now).total_seconds()))
