"""Worker side: turning Celery's lifecycle into Job state.

Every state Celery stores goes through the result backend (jobs.backends), which
calls ``record_state`` here: STARTED (task_track_started), RETRY, SUCCESS, FAILURE and
REVOKED. RECEIVED comes from the ``task_received`` signal, PROGRESS from
``report_progress``; log lines a run writes are buffered and stored as JobLog rows.
Runs that Jobsite did not create (beat, chains, plain ``.delay()``) get their Job row
here the first time the worker sees them.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from celery import Task, current_task, states
from celery.exceptions import Ignore
from celery.utils.time import maybe_iso8601
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from jobs import buffer, guard

logger = logging.getLogger(__name__)
guard_logger = logging.getLogger("jobsite.guard")  # not ignored by the log capture

MAX_LOG_LINES = 1000
MAX_LOG_MESSAGE = 10_000
PROGRESS_MIN_INTERVAL = 0.3  # seconds between two progress writes of one run
MAINTENANCE_PREFIX = "jobsite."  # Jobsite's own tasks: not runs, not recorded
# States a run's row never leaves. LOST is not among them: a redelivered run that runs
# again comes back from it.
FINAL = (states.SUCCESS, states.FAILURE, states.REVOKED)


class JobTask(Task):
    """Base class of catalogued tasks.

    Before running: skip a cancelled run; for job types with the duplicate guard, take
    the run's Redis marker and skip a second delivery of the same run. Retries take
    their limits from the run's options (headers set at submit).
    """

    jobsite_guard = False  # set by catalog.job(guard=True)
    Request = "jobs.commit:JobRequest"  # successful runs' final states group-committed

    def __call__(self, *args, **kwargs):
        request = self.request
        if request.id and not request.is_eager:
            if self.jobsite_guard:
                self._claim(request)
            elif guard.is_revoked(request.id):
                self._skip_cancelled(request.id)
        return super().__call__(*args, **kwargs)

    def _skip_cancelled(self, task_id: str):
        # Cancelled before it started: never execute, whenever the message arrives.
        logger.info("Run %s was cancelled before it started; skipping it", task_id)
        # A run cancelled from Jobsite is REVOKED already; one that only its marker
        # cancelled (beat's run sent ahead of a schedule since changed) is made so.
        result = {"exc_type": "TaskRevokedError", "exc_message": "Cancelled before it started"}
        record_state(task_id, states.REVOKED, result, None, self.request)
        raise Ignore()

    def _claim(self, request) -> None:
        hostname = request.hostname or socket.gethostname()
        claim = guard.claim(request.id, hostname)
        if claim.outcome == "busy" and not self._holder_alive(claim, hostname):
            claim = guard.take_over(request.id, claim.value, hostname) or claim
            if claim.outcome == "claimed":
                guard_logger.warning(
                    "The worker process that was running this job died; running it again."
                )
        if claim.outcome == "claimed":
            request.jobsite_claim = claim.value
            return
        if claim.outcome == "revoked":
            self._skip_cancelled(request.id)
        record_duplicate(request.id, claim)
        raise Ignore()

    def _holder_alive(self, claim, hostname: str) -> bool:
        holder_host, instance, pid = claim.holder
        if holder_host == hostname:
            # Same worker name: a previous incarnation is dead (one runs at a time).
            return instance == guard.INSTANCE and pid != os.getpid() and _pid_alive(pid)
        try:
            return bool(self.app.control.ping(destination=[holder_host], timeout=1.0))
        except Exception:  # cannot ask: assume alive rather than risk running twice
            return True

    def retry(self, *args, **kwargs):
        # Give the marker back first: the retry message may be consumed at once.
        held = getattr(self.request, "jobsite_claim", None)
        if held:
            guard.release(self.request.id, held)
            self.request.jobsite_claim = None
        return super().retry(*args, **kwargs)

    def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:
        held = getattr(self.request, "jobsite_claim", None)
        if held and status != states.RETRY:
            guard.finish(task_id, held)

    def retry_job(self, exc: Exception | None = None, *, reason: str = ""):
        """Retry with this run's max_retries and exponential backoff with jitter.

        The limits come from the run's options (headers set at submit), so an admin's
        change to a job type's defaults applies to new runs without a worker restart.
        """
        request = self.request
        max_retries = _header(request, "jobsite_max_retries", self.max_retries or 0)
        base = _header(request, "jobsite_retry_backoff", 2)
        cap = _header(request, "jobsite_retry_backoff_max", 600)
        delay = min(cap, base * (2**request.retries))
        countdown = round(random.uniform(delay / 2, delay), 3) if delay else 0
        request.jobsite_next_retry = timezone.now() + timedelta(seconds=countdown)
        request.jobsite_retry_reason = reason or (repr(exc) if exc else "")
        return self.retry(exc=exc, countdown=countdown, max_retries=max_retries)


def _header(request, name: str, default):
    value = getattr(request, name, None)
    if value is None:
        value = (request.headers or {}).get(name) if getattr(request, "headers", None) else None
    return default if value is None else value


def report_progress(current: int, total: int, message: str = "") -> None:
    """Called by a running job: store how far it got (throttled), and flush its logs."""
    task = current_task
    if task is None or not task.request.id:
        return
    request = task.request
    now = time.monotonic()
    last = getattr(request, "jobsite_progress_at", 0.0)
    if current < total and now - last < PROGRESS_MIN_INTERVAL:
        return
    request.jobsite_progress_at = now
    from jobs.models import Job, JobState

    # PENDING/RECEIVED too: the STARTED write may still be in its buffer.
    active = [JobState.PENDING, JobState.RECEIVED, JobState.STARTED, JobState.PROGRESS]
    Job.objects.filter(pk=request.id, state__in=active).update(
        state=JobState.PROGRESS,
        progress_current=current,
        progress_total=total,
        progress_message=message[:500],
    )
    log_capture.flush(request.id)


def result_file_path(filename: str) -> Path:
    """A path under MEDIA_ROOT where the running job may write its result file.

    The file is linked to the run when it finishes (downloadable from the run page).
    """
    request = current_task.request
    relative = Path("results") / request.id / Path(filename).name
    absolute = Path(settings.MEDIA_ROOT) / relative
    absolute.parent.mkdir(parents=True, exist_ok=True)
    request.jobsite_result_file = str(relative)
    return absolute


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel directly
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def record_duplicate(task_id: str, claim) -> None:
    """A second delivery of a run that is running or done: count it, log it, skip it."""
    from django.db.models import F

    from jobs.models import Job, JobLog

    where = "already finished" if claim.outcome == "done" else f"running on {claim.holder[0]}"
    logger.warning("Duplicate delivery of run %s skipped (%s)", task_id, where)
    Job.objects.filter(pk=task_id).update(duplicates_skipped=F("duplicates_skipped") + 1)
    if Job.objects.filter(pk=task_id).exists():
        JobLog.objects.create(
            job_id=task_id,
            created_at=timezone.now(),
            level="WARNING",
            logger="jobsite.guard",
            message=f"Duplicate delivery skipped: the run is {where}.",
        )


# --- Recording states ---------------------------------------------------------


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
    from jobs.models import Job

    if not tracked(request):
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


def tracked(request) -> bool:
    """Whether runs of this request's task are recorded as Jobs (all but maintenance)."""
    task_name = getattr(request, "task", None) or getattr(request, "name", "") or ""
    return not task_name.startswith(MAINTENANCE_PREFIX)


def final_job_values(status: str, result, traceback: str | None, request, now) -> list:
    """Parameters of the final-state UPDATE in jobs.backends, in its order.

    The same values ``record_state`` stores through the ORM, prepared for the database.
    """
    from django.db import connection

    from jobs.models import Job

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
    from jobs.models import Job

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
    from jobs.models import Job

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
    from jobs import catalog
    from jobs.models import Job, JobSource, JobType

    task_name = getattr(request, "task", None) or getattr(request, "name", "") or ""
    spec = catalog.by_task_name(task_name)
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
    from django_celery_beat.models import PeriodicTask

    return PeriodicTask.objects.filter(name=name).values_list("pk", flat=True).first()


# --- Log capture --------------------------------------------------------------

MASK = "••••••"
_IGNORED_LOGGERS = ("celery", "kombu", "amqp", "django.db", "urllib3")


class JobLogCapture(logging.Handler):
    """Buffers the log records a run writes, and stores them as JobLog rows."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.buffers: dict[str, list] = {}
        self.counts: dict[str, int] = {}
        self.secrets: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_IGNORED_LOGGERS) or record.name == __name__:
            return
        task = current_task
        task_id = task.request.id if task is not None else None
        if not task_id or task_id not in self.buffers:
            return
        if self.counts[task_id] >= MAX_LOG_LINES:
            return
        self.counts[task_id] += 1
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break the job
            message = str(record.msg)
        for secret in self.secrets.get(task_id, ()):
            message = message.replace(secret, MASK)
        self.buffers[task_id].append(
            (
                datetime.fromtimestamp(record.created, tz=timezone.get_current_timezone()),
                record.levelname,
                record.name,
                message[:MAX_LOG_MESSAGE],
            )
        )

    def start(self, task_id: str, secrets: list[str] | None = None) -> None:
        self.buffers[task_id] = []
        self.counts[task_id] = 0
        # Longest first, so a secret containing another is masked whole.
        self.secrets[task_id] = sorted((s for s in secrets or () if s), key=len, reverse=True)

    def flush(self, task_id: str | None = None) -> None:  # type: ignore[override]
        if task_id is None or not self.buffers.get(task_id):
            return
        from jobs.models import JobLog

        lines, self.buffers[task_id] = self.buffers[task_id], []
        rows = [
            JobLog(job_id=task_id, created_at=at, level=level, logger=name, message=message)
            for at, level, name, message in lines
        ]
        try:
            JobLog.objects.bulk_create(rows)
        except IntegrityError:
            logger.warning("Could not store %d log lines of run %s", len(rows), task_id)

    def stop(self, task_id: str) -> None:
        self.flush(task_id)
        self.buffers.pop(task_id, None)
        self.counts.pop(task_id, None)
        self.secrets.pop(task_id, None)


log_capture = JobLogCapture()


def install_log_capture() -> None:
    root = logging.getLogger()
    if log_capture not in root.handlers:
        root.addHandler(log_capture)


def secret_values(task_name: str, kwargs: dict | None) -> list[str]:
    from jobs import catalog

    spec = catalog.by_task_name(task_name)
    if spec is None or not spec.secret_fields or not kwargs:
        return []
    return [str(kwargs[name]) for name in spec.secret_fields if kwargs.get(name)]
