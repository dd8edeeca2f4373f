"""Reading the broker itself: queue depths, without a management plugin.

kombu's passive ``queue_declare`` returns the message count on both transports: on
RabbitMQ from the broker's declare-ok, on Redis as the LLEN of the queue's list plus
its priority sub-queues. A queue that does not exist yet counts as empty. Only the
queues the current broker has are listed: RabbitMQ's headers-exchange queues are not
declared on Redis (jobs/routing.py), so they are no queue of a Redis broker.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import cast

from celery import current_app
from kombu.transport.redis import Channel

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


# --- Runs on a Redis broker -------------------------------------------------------------

REDIS_SCAN_LIMIT = 200_000  # messages read per look; a longer backlog is not looked at


def redis_run_ids_on_broker(queues: set[str], *, limit: int = REDIS_SCAN_LIMIT) -> set[str] | None:
    """The run ids whose messages a Redis broker holds: waiting in ``queues`` (each
    priority list) or taken by a consumer and not yet acknowledged (kombu's ``unacked``
    hash). None when the broker is not Redis, cannot be read, or holds more than
    ``limit`` messages (then nothing may be concluded from what was read).

    kombu's prefixing client does not prefix LRANGE/HSCAN, so ``global_keyprefix`` is
    applied here (docs/internals.md, entry 68).
    """
    try:
        with current_app.connection_for_read() as conn:
            if conn.transport.driver_type != "redis":
                return None
            channel = cast(Channel, conn.default_channel)  # a Redis transport's, checked above
            prefix = getattr(channel, "global_keyprefix", "") or ""
            client = channel.client
            # A private method in kombu-stubs; its contract: docs/internals.md entry 68.
            name_for = channel._q_for_pri  # type: ignore[attr-defined]
            keys = [prefix + name_for(queue, pri)
                    for queue in sorted(queues) for pri in channel.priority_steps]  # fmt: skip
            ids: set[str] = set()
            seen = 0
            for key in dict.fromkeys(keys):  # priority 0 is the queue's own name: once
                for raw in client.execute_command("LRANGE", key, 0, limit):
                    seen += 1
                    ids.add(_run_id(raw))
                if seen > limit:
                    return None
            # After the lists: a message popped meanwhile is in the hash by now (or, in
            # the instant between kombu's BRPOP and its HSET, in neither: the caller
            # looks twice, some seconds apart).
            for _tag, raw in client.hscan_iter(prefix + channel.unacked_key, count=1000):
                seen += 1
                if seen > limit:
                    return None
                with contextlib.suppress(ValueError, TypeError, IndexError):
                    ids.add(_run_id(json.loads(raw)[0]))
            ids.discard("")
            return ids
    except Exception as exc:  # a broker fault: nothing may be concluded
        logger.warning("Could not read the Redis broker's messages: %s", exc)
        return None


def _run_id(raw) -> str:
    """The task id of one kombu Redis message (a JSON string, or an already parsed dict)."""
    try:
        message = json.loads(raw) if isinstance(raw, bytes | str) else raw
        return str(message["headers"].get("id") or message["properties"].get("correlation_id"))
    except (ValueError, TypeError, KeyError, AttributeError):
        return ""
