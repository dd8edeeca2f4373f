"""Workers and queues: pause, resume, purge, and remote control of workers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from celery import current_app
from django.core.exceptions import PermissionDenied
from django.utils import timezone

from jobs import redis
from jobs.models import (
    AuditAction,
    AuditOutcome,
    Job,
    JobState,
)
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
