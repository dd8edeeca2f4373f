"""Moving a Redis broker from Jobsite's old key layout to kombu's default one.

Up to 0.3.1 Jobsite set ``sep: ":"`` in its Redis transport options, so kombu kept a
queue's priority lists as ``default:1`` ... ``default:9`` and its exchange bindings as
``routing_key:pattern:queue``. Every other Celery client, Flower and ``celery inspect``
use kombu's default separator ``"\\x06\\x16"``: their priority messages went to keys
Jobsite never read, and each side failed to parse the other's bindings.

``redis_queues_migrate`` moves what waits under the old names to the new ones: each
message with one LMOVE (atomic: at every instant it is in exactly one list), the
oldest still served first and ahead of anything already under the new key; each
binding rewritten in one MULTI/EXEC. Running it again finds nothing to move.
``manage.py migrate_redis_queues`` runs it, and so does every worker at start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import cast

from celery import current_app
from kombu.transport.redis import Channel
from kombu.utils.encoding import bytes_to_str

logger = logging.getLogger(__name__)

LEGACY_SEP = ":"
LEGACY_STEPS = range(1, 10)  # priority 0 lived (and lives) under the queue's own name
# Binding tables, and (kombu 5.7+) the sets of the bindings that never expire.
BINDINGS = ("_kombu.binding.", "_kombu.binding_permanent.")


@dataclass
class RedisQueueMigration:
    broker: str
    moved: dict[str, int] = field(default_factory=dict)  # "old -> new" key: messages
    bindings: int = 0  # binding entries rewritten
    dropped: list[str] = field(default_factory=list)  # entries no reading can recover
    skipped: list[str] = field(default_factory=list)  # old keys left alone, with why

    @property
    def messages(self) -> int:
        return sum(self.moved.values())


def redis_queues_migrate(*, dry_run: bool = False) -> RedisQueueMigration:
    """Move messages and bindings stored under the old separator (see the module)."""
    with current_app.connection_for_write() as conn:
        if conn.transport.driver_type != "redis":
            return RedisQueueMigration(broker=conn.transport.driver_type)
        channel = cast(Channel, conn.default_channel)  # a Redis transport's, checked above
        report = RedisQueueMigration(broker="redis")
        if channel.sep == LEGACY_SEP:  # still configured the old way: nothing is old
            return report
        client = channel.client
        queues = _rewrite_bindings(client, channel.sep, report, dry_run)
        queues.update(current_app.amqp.queues)
        for queue in sorted(queues):
            for step in LEGACY_STEPS:
                # The step the configured priority_steps put this priority in.
                new_step = channel.priority(step)
                new = f"{queue}{channel.sep}{new_step}" if new_step else queue
                _move_list(client, f"{queue}{LEGACY_SEP}{step}", new, report, dry_run)
        return report


def _rewrite_bindings(client, sep: str, report: RedisQueueMigration, dry_run: bool) -> set[str]:
    """Rewrite old ``rk:pattern:queue`` entries; return every queue named in a binding."""
    queues: set[str] = set()
    keys = [key for prefix in BINDINGS for key in client.scan_iter(match=f"{prefix}*", count=500)]
    for key in keys:
        for member in map(bytes_to_str, client.smembers(key)):
            if sep in member:
                queues.add(member.split(sep)[-1])
                continue
            parts = member.split(LEGACY_SEP)
            if len(parts) != 3:
                # A name with ":" in it: no way to know where it splits. Leaving it
                # would break every lookup on this exchange (kombu unpacks 3 parts);
                # workers bind their own queues again when they start.
                report.dropped.append(f"{bytes_to_str(key)}: {member!r}")
                if not dry_run:
                    client.srem(key, member)
                continue
            queues.add(parts[2])
            report.bindings += 1
            if not dry_run:
                with client.pipeline(transaction=True) as pipe:
                    pipe.sadd(key, sep.join(parts)).srem(key, member).execute()
    return queues


def _move_list(client, old: str, new: str, report: RedisQueueMigration, dry_run: bool) -> None:
    kind = bytes_to_str(client.type(old))
    if kind == "none":
        return
    if kind != "list":
        report.skipped.append(f"{old!r} is a {kind}, not a queue")
        return
    if dry_run:
        report.moved[f"{old!r} -> {new!r}"] = client.llen(old)
        return
    moved = 0
    # kombu pushes on the left and pops on the right: taking from the left (newest)
    # and pushing on the right keeps the old order, ahead of newer messages.
    while client.lmove(old, new, "LEFT", "RIGHT") is not None:
        moved += 1
    if moved:
        report.moved[f"{old!r} -> {new!r}"] = moved
        logger.info("Moved %d message(s) from %r to %r", moved, old, new)
