"""Worker side of the per-run markers (jobs.markers): cancelled runs and the duplicate guard.

One key per run, ``jobsite:run:<task id>``, holds one of:

- ``revoked``: the run was cancelled; every worker skips it, whenever the message
  arrives (Celery's own revoke list lives in worker memory and misses workers that
  were down when the revoke was broadcast);
- ``run|<hostname>|<instance>|<pid>|<token>``: a worker process is executing it now
  (``instance`` is drawn when the worker starts, so a restarted worker with the same
  name knows the marker belongs to its previous, dead incarnation);
- ``done``: it finished; a late second delivery is a duplicate and is skipped.

Every run checks before it starts whether it was cancelled. So that the check costs
no round trip to Redis per run, a cancel also adds the run to an index (a sorted set,
``jobsite:revoked``) and publishes it (channel ``jobsite:revoked:db<n>``): each worker
process loads the index once subscribed, then keeps its copy current from the channel
(RevokedRuns). A process that cannot rely on its copy (Redis away, its subscription
dropped) asks for the run's marker instead, as before.

Job types that opt in (``guard=True``) take the marker with ``SET NX`` before running
(the classic answer to RabbitMQ's repeated consumption); only the owner, by its token,
may release or finish it (compare-and-set scripts). A marker left by a process that
died is taken over, so acks_late redelivery after a crash still runs the job once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import cast

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

from jobs import markers
from jobs.markers import is_revoked_marker
from jobs.redis import client

logger = logging.getLogger(__name__)

# Drawn once per worker start, in the main process before it forks its pool: every
# pool process of one worker incarnation shares it. The worker's heartbeat keeps it
# known (jobs.heartbeat): a holder whose incarnation is gone is dead, whatever its name.
INSTANCE = secrets.token_hex(4)

LEGACY_INDEXED = "jobsite:revoked:indexed"  # markers from before the index: indexed
CONFIRM_EVERY = 1.0  # seconds: a subscription is proven alive (PING) at least this often
CONFIRM_TIMEOUT = 5.0
RESUBSCRIBE_AFTER = 5.0  # seconds: after a failure, the marker is asked meanwhile
PRUNE_EVERY = 3600.0  # seconds: a process's copy forgets the cancels whose markers expired

# Replace the marker only if it still holds the value the caller saw/owns.
_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return false
"""


@functools.cache
def _compare_and_set():
    return client().register_script(_COMPARE_AND_SET)


def is_revoked(task_id: str) -> bool:
    """Whether the run was cancelled (before each run: no round trip, see RevokedRuns)."""
    return _revoked_runs().contains(task_id)


class RevokedRuns:
    """One process's copy of the revoked runs, kept current by Pub/Sub.

    Subscribed to the cancel channel first, then loaded from the index (jobs.markers):
    mark_revoked writes both in one transaction, so no cancel falls between the two. Reading what
    was published since is a poll of the subscription's socket, not a round trip. A
    PING at least every CONFIRM_EVERY seconds proves the subscription alive (its
    answer comes after everything published before it), so a connection that died
    without a word is noticed within that time. Any failure, and a reconnect, drops
    the copy: the checks ask for the run's marker (is_revoked_marker) until one
    subscribes and loads afresh, RESUBSCRIBE_AFTER seconds later. Until a worker has
    indexed the markers set before the index (index_legacy_markers), the copy is not
    trusted either.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the threads pool checks from several threads
        self._pubsub: redis.client.PubSub | None = None
        self._pid = 0
        self._until: dict[str, int] = {}  # run id -> its marker's expiry (ms)
        self._confirmed = 0.0  # time.monotonic() of the last proof of life
        self._pruned = time.monotonic()
        self._stale = False
        self._trusted = False  # the legacy markers are indexed
        self._retry_at = 0.0  # time.monotonic() after which to subscribe again

    def contains(self, task_id: str) -> bool:
        with self._lock:
            if self._pubsub is None and time.monotonic() < self._retry_at:
                return is_revoked_marker(task_id)
            try:
                self._update()
            except (redis.RedisError, OSError) as exc:
                logger.warning(
                    "Cancelled runs: no subscription (%s); asking Redis per run for %d s",
                    exc,
                    RESUBSCRIBE_AFTER,
                )
                self._drop()
                self._retry_at = time.monotonic() + RESUBSCRIBE_AFTER
                return is_revoked_marker(task_id)
            except BaseException:  # e.g. a time limit, perhaps with a message half taken in
                self._drop()
                raise
            if not self._trusted:
                return is_revoked_marker(task_id)
            until = self._until.get(task_id)
        return until is not None and until > markers.now_ms()

    def _update(self) -> None:
        if self._pubsub is None or self._stale or self._pid != os.getpid():
            self._drop()
            self._subscribe()
        pubsub = self._pubsub
        assert pubsub is not None  # _subscribe() set it, or raised
        if time.monotonic() - self._confirmed > CONFIRM_EVERY:
            pubsub.ping()
            self._read(pubsub, until="pong")
            if not self._trusted:
                self._trusted = bool(client().exists(LEGACY_INDEXED))
            if time.monotonic() - self._pruned > PRUNE_EVERY:
                self._prune()
        else:
            self._read(pubsub)

    def _read(self, pubsub, until: str | None = None) -> None:
        """Take in what was published; with ``until``, wait for that reply ("pong", ...)."""
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while True:
            timeout = max(0.0, deadline - time.monotonic()) if until else 0.0
            try:
                message = pubsub.get_message(timeout=timeout)
            except redis.TimeoutError:
                if until:
                    raise
                return  # part of a message has arrived: the rest is read next time
            if self._stale:
                raise redis.ConnectionError("reconnected: what was published meanwhile is lost")
            if message is None:
                if not until:
                    return
                if time.monotonic() >= deadline:
                    raise redis.TimeoutError("no answer on the cancelled-runs subscription")
                continue
            kind = message["type"]
            if kind == "message":
                run_id = message["data"].decode()
                self._until[run_id] = markers.now_ms() + markers.REVOKED_TTL_MS
            elif kind == until:
                self._confirmed = time.monotonic()
                return

    def _prune(self) -> None:
        now = markers.now_ms()
        self._until = {run_id: until for run_id, until in self._until.items() if until > now}
        self._pruned = time.monotonic()

    def _subscribe(self) -> None:
        pubsub = _subscriber().pubsub()
        try:
            pubsub.subscribe(markers.channel())
            self._read(pubsub, until="subscribe")
            # Only on a reconnect: the first connection is made already.
            pubsub.connection.register_connect_callback(self._on_reconnect)
            with client().pipeline(transaction=False) as pipe:
                pipe.zrangebyscore(markers.REVOKED_INDEX, markers.now_ms(), "+inf", withscores=True)
                pipe.exists(LEGACY_INDEXED)
                loaded, indexed = pipe.execute()
        except BaseException:
            self._close(pubsub)
            raise
        self._until = {run_id.decode(): int(until) for run_id, until in loaded}
        self._trusted = bool(indexed)
        self._pubsub, self._pid = pubsub, os.getpid()
        self._pruned = time.monotonic()

    def _on_reconnect(self, connection) -> None:
        self._stale = True

    def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._stale = False
        self._until = {}
        if pubsub is not None and self._pid == os.getpid():  # not the parent's, after a fork
            self._close(pubsub)

    def _close(self, pubsub) -> None:
        # Its connection goes back to the pool: our callback must not go with it.
        with contextlib.suppress(redis.RedisError, OSError, ValueError):
            if pubsub.connection is not None:
                pubsub.connection.deregister_connect_callback(self._on_reconnect)
            pubsub.close()


@functools.cache
def _revoked_runs() -> RevokedRuns:
    return RevokedRuns()


@functools.cache
def _subscriber() -> redis.Redis:
    # No silent reconnect: one would lose what was published meanwhile (RevokedRuns).
    return redis.Redis.from_url(
        settings.JOBSITE_REDIS_URL,
        socket_connect_timeout=2,
        socket_timeout=CONFIRM_TIMEOUT,
        # Not on a timeout either: a poll that finds half a message raises one.
        retry=Retry(NoBackoff(), 0, supported_errors=(redis.ConnectionError,)),
    )


def index_legacy_markers() -> int:
    """Index the cancel markers set before the index existed (once per Redis).

    Run by each worker as it starts, before its pool: a run cancelled before an upgrade
    must stay cancelled. Returns how many it indexed.
    """
    r = client()
    if r.exists(LEGACY_INDEXED):
        return 0
    indexed = 0
    keys: list[bytes] = []
    for key in r.scan_iter(match=markers.key("*"), count=1000):
        keys.append(key)
        if len(keys) >= 1000:
            indexed += _index_markers(r, keys)
            keys = []
    indexed += _index_markers(r, keys)
    r.set(LEGACY_INDEXED, "1")
    return indexed


def _index_markers(r: redis.Redis, keys: list[bytes]) -> int:
    """Add the cancelled ones among these marker keys to the index; how many were."""
    if not keys:
        return 0
    with r.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute()
    now = markers.now_ms()
    prefix = markers.key("")
    found = {
        key.decode().removeprefix(prefix): now + (ttl if ttl > 0 else markers.REVOKED_TTL_MS)
        for key, value, ttl in zip(keys, replies[::2], replies[1::2], strict=True)
        if value == markers.REVOKED
    }
    if found:
        r.zadd(markers.REVOKED_INDEX, found)
    return len(found)


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to take a run's marker."""

    outcome: str  # "claimed", "revoked", "done" or "busy"
    value: bytes = b""  # what we hold (claimed) or saw (busy)

    @property
    def holder(self) -> tuple[str, str, int] | None:
        """(worker name, worker incarnation, process id) of the process holding the run."""
        return markers.holder(self.value)


def _value(hostname: str) -> bytes:
    return f"run|{hostname}|{INSTANCE}|{os.getpid()}|{secrets.token_hex(8)}".encode()


def claim(task_id: str, hostname: str) -> Claim:
    value = _value(hostname)
    key = markers.key(task_id)
    r = client()
    if r.set(key, value, nx=True, px=markers.RUNNING_TTL_MS):
        return Claim("claimed", value)
    current = r.get(key)
    if current is None:  # expired in between: try once more
        return (
            Claim("claimed", value)
            if r.set(key, value, nx=True, px=markers.RUNNING_TTL_MS)
            else Claim("busy")
        )
    if current == markers.REVOKED:
        return Claim("revoked")
    if current == markers.DONE:
        return Claim("done")
    return Claim("busy", cast(bytes, current))  # client() never decodes responses


def take_over(task_id: str, seen: bytes, hostname: str) -> Claim | None:
    """Replace a dead holder's marker with ours (None if someone else changed it first)."""
    value = _value(hostname)
    if _compare_and_set()(keys=[markers.key(task_id)], args=[seen, value, markers.RUNNING_TTL_MS]):
        return Claim("claimed", value)
    return None


def finish(task_id: str, held: bytes) -> None:
    """The run is over: later deliveries of it are duplicates."""
    _compare_and_set()(keys=[markers.key(task_id)], args=[held, markers.DONE, markers.DONE_TTL_MS])


def release(task_id: str, held: bytes) -> None:
    """Give the marker back (before a retry, whose new message must be able to claim it)."""
    markers.compare_and_delete(task_id, held)
