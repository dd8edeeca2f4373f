"""Worker side: turning Celery's lifecycle into Job state.

Every state Celery stores goes through the result backend (jobs.worker.backend), which
calls ``record_state`` here: STARTED (task_track_started), RETRY, SUCCESS, FAILURE and
REVOKED. RECEIVED comes from the ``task_received`` signal, PROGRESS from
``report_progress``; log lines a run writes are buffered and stored as JobLog rows.
Runs that Jobsite did not create (beat, chains, plain ``.delay()``) get their Job row
here the first time the worker sees them.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from celery import current_task, states
from celery.utils.time import maybe_iso8601
from django.db import IntegrityError, transaction
from django.db.models import Case, F, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from jobs import specs
from jobs.models import Job, JobSource, JobType
from jobs.worker import buffer

logger = logging.getLogger(__name__)

MAX_LOG_LINES = 1000
MAX_LOG_MESSAGE = 10_000
PROGRESS_MIN_INTERVAL = 0.3  # seconds between two progress writes of one run
MAINTENANCE_PREFIX = "jobsite."  # Jobsite's own tasks: not runs, not recorded
# States a run's row never leaves. LOST is not among them: a redelivered run that runs
# again comes back from it.
FINAL = (states.SUCCESS, states.FAILURE, states.REVOKED)


def record_received(request) -> None:
    """In the worker's main process (Celery's bottleneck): buffered, written in batches.

    The time also travels with the request to the pool process (its request dict is
    what the pool process runs), so the final write records it: a run that finishes
    before the batch is written still has its received time, at no extra write.
    """
    now = timezone.now()
    request.request_dict["jobsite_received_at"] = now.timestamp()
    buffer.received.add((now, request.hostname or "", request.id))


def record_state(task_id: str, status: str, result, traceback: str | None, request) -> None:
    """Store one Celery state transition on the run's Job row (creating it if needed)."""
    if not tracked(request):
        return
    if status == states.STARTED and _guarded(task_id):
        # Stored once the run's marker is ours (record_claimed_start): a delivery the
        # guard skips must leave the run's state, worker and start time alone.
        return
    if status == states.STARTED and _submitted_by_jobsite(request):
        # Its row exists: STARTED is informative, so it is buffered; the final write
        # (durable before the ack) carries started_at as well.
        request.jobsite_started_at = timezone.now()
        buffer.started.add((request.jobsite_started_at, request.hostname or "", task_id))
        return
    # A run that finishes within the batch interval never needs its STARTED write.
    buffer.started.discard(task_id)
    fields = _fields_for(status, result, traceback, request)
    if status == states.RETRY:
        _record_retry(task_id, fields, request)
        return
    changes = dict(fields)
    if "received_at" in changes:  # keep the batch's value if it got there first
        changes["received_at"] = Coalesce(F("received_at"), Value(changes["received_at"]))
    updated = Job.objects.filter(pk=task_id).exclude(state__in=FINAL).update(**changes)
    if not updated and not Job.objects.filter(pk=task_id).exists():
        _create_from_request(task_id, request, fields)


def record_claimed_start(task_id: str, request) -> None:
    """A guarded run starts for real (its marker is ours): STARTED, and one execution more.

    Written at once, not buffered: the count of executions is what tells an operator
    that a run executed again after a crash.
    """
    if not tracked(request):
        return
    now = timezone.now()
    request.jobsite_started_at = now
    hostname = getattr(request, "hostname", None) or ""
    buffer.started.discard(task_id)
    updated = (
        Job.objects.filter(pk=task_id)
        .exclude(state__in=FINAL)
        .update(
            state=Case(When(state__in=_STARTABLE, then=Value(states.STARTED)), default=F("state")),
            started_at=now,
            worker=hostname,
            executions=F("executions") + 1,
        )
    )
    if not updated and not Job.objects.filter(pk=task_id).exists():
        fields = {"state": states.STARTED, "started_at": now, "executions": 1}
        if hostname:
            fields["worker"] = hostname
        _create_from_request(task_id, request, fields)


_STARTABLE = [states.PENDING, "RECEIVED", states.RETRY, "LOST"]


def _guarded(task_id: str) -> bool:
    # Celery's tracer has pushed the task before it stores STARTED.
    task = current_task
    return bool(
        task is not None and getattr(task, "jobsite_guard", False) and task.request.id == task_id
    )


def tracked(request) -> bool:
    """Whether runs of this request's task are recorded as Jobs (all but maintenance)."""
    task_name = getattr(request, "task", None) or getattr(request, "name", "") or ""
    return not task_name.startswith(MAINTENANCE_PREFIX)


def final_job_values(status: str, result, traceback: str | None, request, now) -> list:
    """Parameters of the final-state UPDATE in jobs.worker.backend, in its order.

    The same values ``record_state`` stores through the ORM, prepared for the database.
    """
    from django.db import connection

    fields = _fields_for(status, result, traceback, request, now)
    values = [
        status,
        fields.get("worker", ""),
        fields.get("started_at"),
        fields.get("received_at"),
        fields["finished_at"],
    ]
    if status == states.SUCCESS:
        prepared = Job._meta.get_field("result").get_db_prep_save(result, connection)
        values += [prepared, fields.get("result_file", "")]
    else:
        values += [fields["exception_type"], fields["error_message"], fields["traceback"]]
    return values


def job_is_final(task_id: str) -> bool:
    return Job.objects.filter(pk=task_id, state__in=FINAL).exists()


def _submitted_by_jobsite(request) -> bool:
    """Runs Jobsite published carry its headers; their Job row exists before they start."""
    return getattr(request, "jobsite_max_retries", None) is not None or bool(
        (getattr(request, "headers", None) or {}).get("jobsite_max_retries") is not None
    )


def _fields_for(status: str, result, traceback: str | None, request, now=None) -> dict:
    now = now or timezone.now()
    fields: dict = {"state": status}
    hostname = getattr(request, "hostname", None)
    if hostname:
        fields["worker"] = hostname
    started_at = getattr(request, "jobsite_started_at", None)
    if started_at and status in (states.SUCCESS, states.FAILURE, states.RETRY):
        fields["started_at"] = started_at
    received_at = _received_at(request)
    if received_at and status in (states.SUCCESS, states.FAILURE):
        fields["received_at"] = received_at
    if status == states.STARTED:
        fields["started_at"] = now
    elif status == states.SUCCESS:
        fields.update(finished_at=now, result=result)
        result_file = getattr(request, "jobsite_result_file", None)
        if result_file:
            fields["result_file"] = result_file
    elif status in (states.FAILURE, states.REVOKED):
        exc_type, message = _exception_parts(result)
        fields.update(
            finished_at=now,
            exception_type=exc_type,
            error_message=message,
            traceback=traceback or "",
        )
    return fields


def _exception_parts(result) -> tuple[str, str]:
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message") or ""
        if isinstance(message, (list, tuple)):
            message = " ".join(str(part) for part in message)
        return str(result["exc_type"]), str(message)
    return "", "" if result is None else str(result)


def _record_retry(task_id: str, fields: dict, request) -> None:
    # Retries are rare, so a read-modify-write of the history is affordable here.
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=task_id).first()
        if job is None:
            _create_from_request(task_id, request, fields)
            return
        next_at: datetime | None = getattr(request, "jobsite_next_retry", None)
        job.retries = (getattr(request, "retries", 0) or 0) + 1
        job.retry_history = [
            *job.retry_history,
            {
                "attempt": job.retries,
                "at": timezone.now().isoformat(),
                "reason": getattr(request, "jobsite_retry_reason", "")[:1000],
                "next_attempt_at": next_at.isoformat() if next_at else None,
            },
        ]
        job.state = fields["state"]
        job.save(update_fields=["retries", "retry_history", "state"])


def _create_from_request(task_id: str, request, fields: dict) -> None:
    """First sight of a run Jobsite did not submit: beat, workflows, plain .delay()."""
    task_name = getattr(request, "task", None) or getattr(request, "name", "") or ""
    if not task_name:
        # Nothing says what ran: a state stored for an id no worker has seen, such as
        # `celery control revoke <unknown id>` (Celery marks it REVOKED in the result
        # backend with no request). Celery keeps its own TaskResult; a Job row would be
        # a phantom run in history, with no task and no job type.
        logger.debug("No run recorded for %s (%s): no task name", task_id, fields["state"])
        return
    spec = specs.by_task_name(task_name)
    schedule_name = getattr(request, "periodic_task_name", None) or ""
    root_id = getattr(request, "root_id", None) or ""
    if schedule_name:
        source = JobSource.BEAT
    elif root_id and root_id != task_id:
        source = JobSource.WORKFLOW
    else:
        source = JobSource.EXTERNAL
    delivery = getattr(request, "delivery_info", None) or {}
    params = dict(getattr(request, "kwargs", None) or {})
    args = getattr(request, "args", None)
    if args:
        params["_args"] = list(args)
    # Submitted and sent elsewhere, when is not known here: the earliest time Jobsite
    # knows of is the worker's receipt (a run sent ahead waits there for its ETA).
    received_at = _received_at(request)
    first_seen = received_at or timezone.now()
    job = Job(
        id=task_id,
        created_at=first_seen,
        task_name=task_name,
        job_type=JobType.objects.filter(name=spec.name).first() if spec else None,
        params=params,
        source=source,
        schedule_name=schedule_name,
        schedule_id=_schedule_id(schedule_name),
        workflow_id=root_id if root_id != task_id else "",
        queue=delivery.get("routing_key") or "",
        priority=delivery.get("priority"),
        sent_at=first_seen,
        eta=maybe_iso8601(getattr(request, "eta", None)),  # beat's runs sent ahead have one
        **{"received_at": received_at, **fields},
    )
    try:
        with transaction.atomic():
            job.save(force_insert=True)
    except IntegrityError:
        # Another process created it in between: apply our transition to that row.
        Job.objects.filter(pk=task_id).update(**fields)


def _received_at(request) -> datetime | None:
    """When the worker's main process received the run (it travels in the request)."""
    received = getattr(request, "jobsite_received_at", None)
    return datetime.fromtimestamp(received, tz=UTC) if received else None


def _schedule_id(name: str) -> int | None:
    if not name:
        return None

    return PeriodicTask.objects.filter(name=name).values_list("pk", flat=True).first()
