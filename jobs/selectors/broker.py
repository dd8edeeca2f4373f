"""Reading the broker itself: queue depths, without a management plugin.

kombu's passive ``queue_declare`` returns the message count on both transports: on
RabbitMQ from the broker's declare-ok, on Redis as the LLEN of the queue's list plus
its priority sub-queues. A queue that does not exist yet counts as empty. Only the
queues the current broker has are listed: RabbitMQ's headers-exchange queues are not
declared on Redis (jobs/routing.py), so they are no queue of a Redis broker.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from celery import current_app

from jobs import routing

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueDepth:
    name: str
    messages: int | None  # None: the broker could not be asked
    consumers: int | None


def queue_names() -> tuple[str, ...]:
    """The point-to-point queues Jobsite declares on the current broker, in order."""
    declared = {queue.name for queue in routing.queues_for(current_app.conf.broker_url)}
    return tuple(name for name in routing.ALL_QUEUE_NAMES if name in declared)


def queue_depths(names: tuple[str, ...] | None = None) -> list[QueueDepth]:
    names = queue_names() if names is None else names
    try:
        with current_app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            return [_depth(conn, name) for name in names]
    except Exception as exc:  # any broker fault: show "unknown", never a 500
        logger.warning("Could not read queue depths: %s", exc)
        return [QueueDepth(name, None, None) for name in names]


def _depth(conn, name: str) -> QueueDepth:
    channel = conn.channel()
    try:
        ok = channel.queue_declare(queue=name, passive=True)
        # Redis has no consumer registry: its count is always 0, so show "unknown".
        consumers = ok.consumer_count if conn.transport.driver_type == "amqp" else None
        return QueueDepth(name, ok.message_count, consumers)
    except Exception:  # NOT_FOUND on RabbitMQ closes the channel: the queue is empty
        return QueueDepth(name, 0, 0)
    finally:
        # The broker may already have closed it (RabbitMQ does on NOT_FOUND).
        with contextlib.suppress(Exception):
            channel.close()


def broker_kind() -> str:
    url = current_app.conf.broker_url or ""
    return "RabbitMQ" if url.startswith(("amqp", "pyamqp")) else "Redis"
