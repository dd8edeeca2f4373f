"""Per-run markers in Redis: cancelled runs and the duplicate-delivery guard.

One key per run, ``jobsite:run:<task id>``, holds one of:

- ``revoked``: the run was cancelled; every worker skips it, whenever the message
  arrives (Celery's own revoke list lives in worker memory and misses workers that
  were down when the revoke was broadcast);
- ``run|<hostname>|<instance>|<pid>|<token>``: a worker process is executing it now
  (``instance`` is drawn when the worker starts, so a restarted worker with the same
  name knows the marker belongs to its previous, dead incarnation);
- ``done``: it finished; a late second delivery is a duplicate and is skipped.

Job types that opt in (``guard=True``) take the marker with ``SET NX`` before running
(the classic answer to RabbitMQ's repeated consumption); only the owner, by its token,
may release or finish it (compare-and-set scripts). A marker left by a process that
died is taken over, so acks_late redelivery after a crash still runs the job once.
"""

from __future__ import annotations

import functools
import os
import secrets
from dataclasses import dataclass

import redis
from django.conf import settings

REVOKED_TTL_MS = 7 * 24 * 3600 * 1000
DONE_TTL_MS = 24 * 3600 * 1000
RUNNING_TTL_MS = 24 * 3600 * 1000

# Drawn once per worker start, in the main process before it forks its pool: every
# pool process of one worker incarnation shares it.
INSTANCE = secrets.token_hex(4)

REVOKED = b"revoked"
DONE = b"done"

# Replace the marker only if it still holds the value the caller saw/owns.
_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return false
"""
_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@functools.cache
def client() -> redis.Redis:
    return redis.Redis.from_url(
        settings.JOBSITE_REDIS_URL, socket_connect_timeout=2, socket_timeout=5
    )


@functools.cache
def _scripts():
    r = client()
    return r.register_script(_COMPARE_AND_SET), r.register_script(_COMPARE_AND_DELETE)


def _key(task_id: str) -> str:
    return f"jobsite:run:{task_id}"


def mark_revoked(task_id: str) -> None:
    client().set(_key(task_id), REVOKED, px=REVOKED_TTL_MS)


def is_revoked(task_id: str) -> bool:
    return client().get(_key(task_id)) == REVOKED


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to take a run's marker."""

    outcome: str  # "claimed", "revoked", "done" or "busy"
    value: bytes = b""  # what we hold (claimed) or saw (busy)

    @property
    def holder(self) -> tuple[str, str, int]:
        """(worker name, worker incarnation, process id) of the process holding the run."""
        _, hostname, instance, pid, _ = self.value.decode().split("|", 4)
        return hostname, instance, int(pid)


def _value(hostname: str) -> bytes:
    return f"run|{hostname}|{INSTANCE}|{os.getpid()}|{secrets.token_hex(8)}".encode()


def claim(task_id: str, hostname: str) -> Claim:
    value = _value(hostname)
    key = _key(task_id)
    r = client()
    if r.set(key, value, nx=True, px=RUNNING_TTL_MS):
        return Claim("claimed", value)
    current = r.get(key)
    if current is None:  # expired in between: try once more
        return (
            Claim("claimed", value)
            if r.set(key, value, nx=True, px=RUNNING_TTL_MS)
            else Claim("busy")
        )
    if current == REVOKED:
        return Claim("revoked")
    if current == DONE:
        return Claim("done")
    return Claim("busy", current)


def take_over(task_id: str, seen: bytes, hostname: str) -> Claim | None:
    """Replace a dead holder's marker with ours (None if someone else changed it first)."""
    value = _value(hostname)
    compare_and_set, _ = _scripts()
    if compare_and_set(keys=[_key(task_id)], args=[seen, value, RUNNING_TTL_MS]):
        return Claim("claimed", value)
    return None


def finish(task_id: str, held: bytes) -> None:
    """The run is over: later deliveries of it are duplicates."""
    compare_and_set, _ = _scripts()
    compare_and_set(keys=[_key(task_id)], args=[held, DONE, DONE_TTL_MS])


def release(task_id: str, held: bytes) -> None:
    """Give the marker back (before a retry, whose new message must be able to claim it)."""
    _, compare_and_delete = _scripts()
    compare_and_delete(keys=[_key(task_id)], args=[held])
