"""Workers and queues: pause, resume, purge, and remote control of workers."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, cast

from celery import current_app
from django.core.exceptions import PermissionDenied
from django.utils import timezone

from jobs import heartbeat, redis, specs
from jobs.models import (
    AuditAction,
    AuditOutcome,
    Job,
    JobState,
)
from jobs.selectors.workers import WorkerInfo, workers_inspect_cached
from jobs.services.audit import audit_record
from jobs.services.errors import BROKER_ERRORS, ActionError

logger = logging.getLogger(__name__)

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
    worker starting later skips a paused queue too (jobs.worker.signals.on_worker_ready).
    """

    _check_manage(user)
    control = current_app.control
    call: Callable[..., Any]
    if paused:
        redis.client().sadd(PAUSED_QUEUES_KEY, queue)
        action, call = AuditAction.PAUSE, control.cancel_consumer
    else:
        redis.client().srem(PAUSED_QUEUES_KEY, queue)
        action, call = AuditAction.RESUME, control.add_consumer
    return _control_reply(action, user, "queue", queue, lambda: call(queue, reply=True, timeout=2))


def queues_paused() -> set[str]:
    try:
        # redis.client() never decodes responses: members are bytes.
        return {q.decode() for q in cast(set[bytes], redis.client().smembers(PAUSED_QUEUES_KEY))}
    except Exception:  # Redis down: nothing known to be paused
        return set()


def queue_purge(*, queue: str, user) -> int:
    """Delete every message waiting in ``queue`` (superusers only); their runs become cancelled."""

    if not user.is_superuser:
        raise PermissionDenied("Only a superuser may purge a queue.")
    try:
        with current_app.connection_for_write() as conn:
            # Every transport's channel has queue_purge; the stubs type the abstract StdChannel.
            purged = conn.default_channel.queue_purge(queue) or 0  # type: ignore[attr-defined]
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


# --- Task limits, autoscale and pool restart (Flower's worker page) ----------------------

CONTROL_TIMEOUT = 2.0  # seconds a control waits for the worker's reply


def task_names_controllable(worker: str | None = None) -> list[str]:
    """The task names a control may name: the catalogue's and the tasks this app registers,
    or, for one worker, the tasks that worker reports it has (another codebase's worker
    runs tasks this app does not know).

    Forms offer only these and the services check again, so no string a user typed is
    ever sent to workers as a task name. Celery's built-ins (``celery.*``) are left out.
    """
    if worker:
        info = next((i for i in workers_inspect_cached() if i.name == worker), None)
        if info is not None and info.registered:
            return worker_task_names(info)
    names = {spec.task_name for spec in specs.all_specs()}
    names.update(name for name in current_app.tasks if not name.startswith("celery."))
    return sorted(names)


def worker_task_names(info: WorkerInfo) -> list[str]:
    """The tasks a worker reported (``inspect registered``), Celery's built-ins left out."""
    # Celery lists "name [rate_limit=...]" when asked for attributes.
    names = {str(entry).split(" ", 1)[0] for entry in info.registered}
    return sorted(name for name in names if not name.startswith("celery."))


def worker_control_allowed(*, user, action: str, worker: str, **details) -> None:
    """Refuse (audited as denied) a user without ``jobs.manage_workers``."""
    if user.has_perm("jobs.manage_workers"):
        return
    audit_record(
        actor=user, action=action, target_type="worker", target_id=worker[:255],
        outcome=AuditOutcome.DENIED, details=details,
    )  # fmt: skip
    raise PermissionDenied("You may not control workers and queues.")


def _check_task_name(*, user, action: str, worker: str, task_name: str) -> None:
    if task_name in task_names_controllable(worker):
        return
    audit_record(
        actor=user, action=action, target_type="worker", target_id=worker,
        outcome=AuditOutcome.FAILED, details={"task_name": task_name, "error": "unknown task"},
    )  # fmt: skip
    raise ActionError(f"Unknown task “{task_name}”: choose one of the tasks in the list.")


# "ValueError('Pool restarts not enabled')", as kombu's pidbox reports an exception.
_EXC_REPR = re.compile(r"^\w+\(['\"](?P<message>.*)['\"]\)$")


def _refusals(replies: list) -> dict[str, str]:
    """Worker name -> its error, for the workers that answered with one."""
    refused = {}
    for reply in replies:
        for name, answer in reply.items():
            if isinstance(answer, dict) and "error" in answer:
                error = str(answer["error"])
                match = _EXC_REPR.match(error)
                refused[name] = match["message"] if match else error
    return refused


def _control_checked(action: str, user, worker: str, call, hint: str = "", **details) -> list:
    """One remote-control call to one worker; its error reply (or silence) is a failure.

    Unlike ``_control_reply``, a worker that refuses (``{"error": ...}``) or does not
    answer is audited as failed and raises ActionError with the worker's own words.
    """
    try:
        replies = call() or []
    except BROKER_ERRORS as exc:
        audit_record(
            actor=user, action=action, target_type="worker", target_id=worker,
            outcome=AuditOutcome.FAILED, details={**details, "error": str(exc)},
        )  # fmt: skip
        raise ActionError(f"The broker could not be reached: {exc}") from exc
    refused = _refusals(replies)
    problem = ""
    if not replies:
        problem = f"{worker} did not answer within {CONTROL_TIMEOUT:g} s (is it online?)."
    elif refused:
        problem = "; ".join(f"{name} refused: {error}" for name, error in refused.items())
        problem += f". {hint}" if hint else "."
    audit_record(
        actor=user, action=action, target_type="worker", target_id=worker,
        outcome=AuditOutcome.FAILED if problem else AuditOutcome.OK,
        details={**details, "replies": replies, **({"error": problem} if problem else {})},
    )  # fmt: skip
    if problem:
        raise ActionError(problem)
    return replies


def worker_rate_limit(*, worker: str, task_name: str, rate_limit: str | None, user) -> list:
    """Set how often ``worker`` may start runs of ``task_name`` ("10/m"; None: no limit).

    The limit lives in the worker's memory: a restarted worker is back to the task's own.
    """
    action = AuditAction.RATE_LIMIT
    worker_control_allowed(user=user, action=action, worker=worker, task_name=task_name)
    _check_task_name(user=user, action=action, worker=worker, task_name=task_name)
    return _control_checked(
        action, user, worker,
        # None is Celery's "no limit" (the worker then lists none); the stubs omit it.
        lambda: current_app.control.rate_limit(
            task_name, rate_limit,  # type: ignore[arg-type]
            destination=[worker], reply=True, timeout=CONTROL_TIMEOUT,
        ),
        task_name=task_name, rate_limit=rate_limit,
    )  # fmt: skip


def worker_time_limit(
    *, worker: str, task_name: str, soft: int | None, hard: int | None, user
) -> list:
    """Set the soft and hard time limits (s; None: none) of ``task_name`` on ``worker``.

    Jobsite's workers get ``jobsite_time_limit`` (jobs.worker.control): Celery's
    ``time_limit`` and then the task strategies rebuilt, so the next runs are cut off by
    the new limits (Celery's alone leaves a prefork worker on the limits it started with
    until its pool restarts). Another codebase's worker gets Celery's own command. A run
    whose job type has limits carries them in its message, and those always win.
    """
    action = AuditAction.TIME_LIMIT
    worker_control_allowed(user=user, action=action, worker=worker, task_name=task_name)
    _check_task_name(user=user, action=action, worker=worker, task_name=task_name)
    jobsite_worker = heartbeat.worker_last_seen([worker]).get(worker) is not None
    command = "jobsite_time_limit" if jobsite_worker else "time_limit"
    return _control_checked(
        action, user, worker,
        lambda: current_app.control.broadcast(
            command, arguments={"task_name": task_name, "soft": soft, "hard": hard},
            destination=[worker], reply=True, timeout=CONTROL_TIMEOUT,
        ),
        task_name=task_name, soft=soft, hard=hard, command=command,
    )  # fmt: skip


def worker_autoscale(*, worker: str, maximum: int, minimum: int, user) -> list:
    """Change the autoscaler's bounds; only a worker started with --autoscale has one."""
    action = AuditAction.AUTOSCALE
    worker_control_allowed(user=user, action=action, worker=worker, max=maximum, min=minimum)
    return _control_checked(
        action, user, worker,
        lambda: current_app.control.autoscale(
            maximum, minimum, destination=[worker], reply=True, timeout=CONTROL_TIMEOUT
        ),
        hint="Only a worker started with --autoscale=MAX,MIN can be autoscaled.",
        max=maximum, min=minimum,
    )  # fmt: skip


def worker_pool_restart(*, worker: str, user) -> list:
    """Restart the worker's pool processes (Celery refuses unless worker_pool_restarts)."""
    action = AuditAction.POOL_RESTART
    worker_control_allowed(user=user, action=action, worker=worker)
    return _control_checked(
        action, user, worker,
        lambda: current_app.control.pool_restart(
            destination=[worker], reply=True, timeout=CONTROL_TIMEOUT
        ),
        hint="Celery restarts a pool only on a worker whose settings enable it "
        "(CELERY_WORKER_POOL_RESTARTS = True); Jobsite's settings leave it off.",
    )  # fmt: skip
