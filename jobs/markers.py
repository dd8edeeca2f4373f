"""Per-run markers in Redis: the key layout, and the cancel marker every writer sets.

One key per run, ``jobsite:run:<task id>``, holds one of:

- ``revoked``: the run was cancelled; every worker skips it, whenever the message
  arrives (Celery's own revoke list lives in worker memory and misses workers that
  were down when the revoke was broadcast);
- ``run|<hostname>|<instance>|<pid>|<token>``: a worker process is executing it now
  (jobs.worker.guard);
- ``done``: it finished; a late second delivery is a duplicate and is skipped.

A cancel also adds the run to an index (a sorted set, ``jobsite:revoked``) and
publishes it (channel ``jobsite:revoked:db<n>``), so that worker processes keep a copy
of the cancelled runs without a round trip per run (jobs.worker.guard.RevokedRuns).
"""

from __future__ import annotations

import functools
import time

from jobs.redis import client

REVOKED_TTL_MS = 7 * 24 * 3600 * 1000
DONE_TTL_MS = 24 * 3600 * 1000
RUNNING_TTL_MS = 24 * 3600 * 1000

REVOKED = b"revoked"
DONE = b"done"

REVOKED_INDEX = "jobsite:revoked"  # sorted set: revoked run id -> its marker's expiry (ms)
REVOKED_CHANNEL = "jobsite:revoked:db{db}"  # Pub/Sub, each run id as it is revoked

_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def key(task_id: str) -> str:
    return f"jobsite:run:{task_id}"


def now_ms() -> int:
    return int(time.time() * 1000)


def holder(value: bytes) -> tuple[str, str, int] | None:
    """(worker name, incarnation, process id) of a running marker; None for any other."""
    if not value.startswith(b"run|"):
        return None
    _, hostname, instance, pid, _ = value.decode().split("|", 4)
    return hostname, instance, int(pid)


def compare_and_delete(task_id: str, seen: bytes) -> bool:
    """Delete the run's marker only if it still holds ``seen`` (its owner, or a dead one's)."""
    return bool(_compare_and_delete()(keys=[key(task_id)], args=[seen]))


@functools.cache
def _compare_and_delete():
    return client().register_script(_COMPARE_AND_DELETE)


def mark_revoked(task_id: str) -> None:
    now = now_ms()
    # One transaction: a process subscribed before it sees the message; one that
    # subscribes after finds the run in the index.
    with client().pipeline(transaction=True) as pipe:
        pipe.set(key(task_id), REVOKED, px=REVOKED_TTL_MS)
        pipe.zadd(REVOKED_INDEX, {task_id: now + REVOKED_TTL_MS})
        pipe.zremrangebyscore(REVOKED_INDEX, "-inf", now)  # the expired ones
        pipe.publish(channel(), task_id)
        pipe.execute()


def is_revoked_marker(task_id: str) -> bool:
    """Whether the run was cancelled, from the run's own marker: one round trip."""
    return client().get(key(task_id)) == REVOKED


@functools.cache
def channel() -> str:
    # Channels are server-wide, keys are per database: one channel per database.
    return REVOKED_CHANNEL.format(db=client().connection_pool.connection_kwargs.get("db", 0))
