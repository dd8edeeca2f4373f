"""The base class of catalogued tasks (JobTask), and what a running job may call.

Before running: skip a cancelled run; for job types with the duplicate guard, take the
run's Redis marker (jobs.worker.guard) and skip a second delivery of the same run; check
the parameters with the job type's form, whoever sent the message.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from datetime import timedelta
from pathlib import Path

import redis
from celery import Task, current_task, states
from celery.exceptions import Ignore
from django.conf import settings
from django.db.models import F
from django.utils import timezone

from jobs import heartbeat, routing, specs
from jobs.models import Job, JobLog, JobState
from jobs.worker import guard
from jobs.worker.logs import log_capture
from jobs.worker.tracking import (
    PROGRESS_MIN_INTERVAL,
    job_is_final,
    record_claimed_start,
    record_state,
)

logger = logging.getLogger(__name__)
guard_logger = logging.getLogger("jobsite.guard")  # not ignored by the log capture

REFUSED = "Parameters refused by the worker"
# Seconds a run waits for the guard's Redis before it fails (a restart, a network cut).
GUARD_RIDE_OUT = 60.0


class ParametersRefused(Exception):
    """The job type's form refused the parameters a message carried: the job never ran."""


class JobTask(Task):
    """Base class of catalogued tasks.

    Before running: skip a cancelled run; for job types with the duplicate guard, take
    the run's Redis marker and skip a second delivery of the same run; check the
    parameters with the job type's form. Retries take their limits from the run's
    options (headers set at submit).
    """

    jobsite_guard = False  # set by catalog.job(guard=True)
    Request = "jobs.worker.commit:JobRequest"  # successful runs' final states group-committed

    def __call__(self, *args, **kwargs):
        request = self.request
        if request.id and not request.is_eager:
            if self.jobsite_guard:
                self._claim(request)
            elif self._guard(guard.is_revoked, request.id):
                self._skip_cancelled(request.id)
            kwargs = self._checked_params(kwargs)
        return super().__call__(*args, **kwargs)

    def _stored(self, write, *args):
        """Jobsite's own database work before the job runs, riding out a database restart.

        With the database down for a moment (a restart, a fail-over), the run's STARTED
        write failed the run before its code ran, and its state was stored as a failure
        once the database was back. The result backend's retry policy applies instead:
        reconnect and try again with backoff (CELERY_RESULT_BACKEND_MAX_RETRIES).
        """
        return self.backend._ensure_retryable(write, *args)  # type: ignore[attr-defined]  # internals 67

    def _checked_params(self, kwargs: dict) -> dict:
        """The job type's form checks the parameters, whatever client sent the message.

        Jobsite's own messages carry parameters its form already cleaned, but anything
        that can publish to the broker (`celery call`, a plain Celery or kombu producer,
        a client in another language) can send a catalogued task too. A refusal fails
        the run with the form's messages before any job code runs. The job receives the
        cleaned values (coerced, JSON-safe: what a submit stores and sends), so it sees
        the same types however it was sent. Names the form does not know are refused, as
        the API refuses them. Positional arguments (a chain's previous result) pass as
        they are: no form describes them.
        """
        spec = specs.by_task_name(self.name)
        if spec is None:
            return kwargs
        unknown = [name for name in kwargs if name not in spec.form.base_fields]
        errors = {name: ["Unknown parameter."] for name in unknown}
        if not errors:
            cleaned, errors = spec.clean_params(kwargs)
            if cleaned is not None:
                return cleaned
        problems = "; ".join(
            " ".join(messages) if name == "__all__" else f"{name}: {' '.join(messages)}"
            for name, messages in errors.items()
        )
        raise ParametersRefused(f"{REFUSED}: {problems}")

    def _skip_cancelled(self, task_id: str):
        # Cancelled before it started: never execute, whenever the message arrives.
        logger.info("Run %s was cancelled before it started; skipping it", task_id)
        # A run cancelled from Jobsite is REVOKED already; one that only its marker
        # cancelled (beat's run sent ahead of a schedule since changed) is made so.
        result = {"exc_type": "TaskRevokedError", "exc_message": "Cancelled before it started"}
        self._stored(record_state, task_id, states.REVOKED, result, None, self.request)
        raise Ignore()

    def _guard(self, call, *args):
        """A call to the guard's Redis that rides out Redis being away for a moment.

        Cut off from Redis (a host losing the network, Redis restarting), the claim
        failed the run with the job's code never run, while the broker handed the
        message to another worker that saw the marker — set by the claim whose reply was
        lost — and skipped it as a duplicate: a FAILURE and nothing done. The call is
        tried again with backoff for GUARD_RIDE_OUT seconds; a claim tried again finds
        this process's own marker and takes it over (_holder_alive: not another live
        process).
        """
        deadline = time.monotonic() + GUARD_RIDE_OUT
        delay = 0.2
        while True:
            try:
                return call(*args)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("The guard's Redis did not answer (%s): again in %.1f s", exc,
                               delay)  # fmt: skip
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _claim(self, request) -> None:
        hostname = request.hostname or socket.gethostname()
        claim = self._guard(guard.claim, request.id, hostname)
        if claim.outcome == "busy" and not self._holder_alive(claim, hostname):
            seen = claim
            # Changed meanwhile: taken over by another process, or dropped by the
            # reconciler (jobs.services.jobs_reclaim_orphans), so ask once more.
            claim = self._guard(guard.take_over, request.id, claim.value, hostname) or (
                self._guard(guard.claim, request.id, hostname)
            )
            if claim.outcome == "claimed" and self._stored(job_is_final, request.id):
                # Its final state was stored, but its holder died before marking it
                # done: at most once after the final state, so it does not run again.
                guard.finish(request.id, claim.value)
                claim = guard.Claim("done")
            elif (
                claim.outcome == "claimed"
                and seen.holder
                and seen.holder[1:] == (guard.INSTANCE, os.getpid())
            ):
                pass  # our own claim, whose reply was lost (_guard): nobody died
            elif claim.outcome == "claimed":
                holder = seen.holder
                assert holder is not None  # a busy claim's marker names its holder
                holder_host, instance, pid = holder
                before = Job.objects.filter(pk=request.id).values_list("started_at", flat=True)
                started = before.first()  # None: it died before its STARTED was stored
                after = (
                    f" {(timezone.now() - started).total_seconds():.1f} s after it started"
                    if started
                    else ""
                )
                guard_logger.warning(
                    "The worker process that was running this job died%s (%s, incarnation "
                    "%s, process %d); running it again.",
                    after,
                    holder_host,
                    instance,
                    pid,
                )
        if claim.outcome == "claimed":
            request.jobsite_claim = claim.value
            self._stored(record_claimed_start, request.id, request)
            return
        if claim.outcome == "revoked":
            self._skip_cancelled(request.id)
        self._stored(record_duplicate, request.id, claim)
        raise Ignore()

    def _holder_alive(self, claim, hostname: str) -> bool:
        """Whether the process holding the run's marker still exists (by incarnation).

        A worker's name outlives its processes (a supervisor restarts it under the
        same name), so it proves nothing: the holder's incarnation must still be
        heartbeating (jobs.heartbeat) and, on this machine, its process exist.
        """
        if claim.holder is None:  # busy, holder unknown (it changed as we looked)
            return True
        holder_host, instance, pid = claim.holder
        if instance == guard.INSTANCE:
            return pid != os.getpid() and heartbeat.process_alive(pid)
        if holder_host == hostname:
            return False  # a previous incarnation of this worker: one runs at a time
        try:
            return heartbeat.holders_alive([(instance, pid)])[0]
        except Exception:  # cannot ask: assume alive rather than risk running twice
            return True

    def retry(self, *args, **kwargs):
        if kwargs.get("countdown") and routing.uses_quorum(self.app.amqp.queues.values()):
            kwargs["countdown"] = routing.native_delay(kwargs["countdown"])
        # Give the marker back first: the retry message may be consumed at once.
        held = getattr(self.request, "jobsite_claim", None)
        if held:
            assert self.request.id is not None  # a claim is only taken for a run's id
            guard.release(self.request.id, held)
            # Celery's Context takes any attribute; its stubs list only Celery's own.
            self.request.jobsite_claim = None  # type: ignore[attr-defined]
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
        # Celery's Context takes any attribute; its stubs list only Celery's own.
        request.jobsite_next_retry = timezone.now() + timedelta(seconds=countdown)  # type: ignore[attr-defined]
        request.jobsite_retry_reason = reason or (repr(exc) if exc else "")  # type: ignore[attr-defined]
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
    request.jobsite_progress_at = now  # type: ignore[attr-defined]  # Context takes any attribute

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
    assert request.id is not None  # called by a running job
    relative = Path("results") / request.id / Path(filename).name
    absolute = Path(settings.MEDIA_ROOT) / relative
    absolute.parent.mkdir(parents=True, exist_ok=True)
    request.jobsite_result_file = str(relative)  # type: ignore[attr-defined]  # as above
    return absolute


def record_duplicate(task_id: str, claim) -> None:
    """A second delivery of a run that is running or done: count it, log it, skip it.

    Nothing else of the run changes: not its state, worker or start time (its STARTED
    waits for the claim, jobs.worker.tracking.record_claimed_start).
    """
    holder = claim.holder if claim.outcome == "busy" else None
    where = (
        "already finished"
        if claim.outcome == "done"
        else f"running on {holder[0] if holder else 'another worker'}"
    )
    logger.warning("Duplicate delivery of run %s skipped (%s)", task_id, where)
    # The log line first: whoever sees the count has its line to read.
    if Job.objects.filter(pk=task_id).exists():
        JobLog.objects.create(
            job_id=task_id,
            created_at=timezone.now(),
            level="WARNING",
            logger="jobsite.guard",
            message=f"Duplicate delivery skipped: the run is {where}.",
        )
    Job.objects.filter(pk=task_id).update(duplicates_skipped=F("duplicates_skipped") + 1)
