"""Liveness marks in Redis: when beat last ticked, when each worker last said it lives.

A worker is known by name (what people see) and by incarnation: the token drawn each
time a worker starts (jobs.worker.guard.INSTANCE). A name outlives its processes — a
supervisor restarts a killed worker under the same name — so whether a run's holder
still exists is asked of its incarnation: ``jobsite:worker:incarnation:<instance>``
holds the machine it runs on and expires INCARNATION_TTL seconds after the worker's
last heartbeat. Gone key, gone incarnation; on the same machine, the holding process
must exist as well (a SIGKILLed worker's key outlives it by up to INCARNATION_TTL).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime
from typing import cast

from jobs import redis

logger = logging.getLogger(__name__)

BEAT_KEY = "jobsite:beat:last_seen"


def beat_seen_now() -> None:
    redis.client().set(BEAT_KEY, f"{time.time():.3f}", ex=24 * 3600)


def beat_last_seen() -> datetime | None:
    try:
        raw = redis.client().get(BEAT_KEY)
    except Exception:  # Redis down: unknown, not an error page
        return None
    return datetime.fromtimestamp(float(raw), tz=UTC) if raw else None


# Every beat, active or standing by, reports itself each tick (a hash: "host:pid" -> its
# role, since when, its last tick and its last send), for the pages: which beat holds
# the lock, which stand by, and a takeover when it happens.
BEATS_KEY = "jobsite:beats"
BEAT_FORGOTTEN_AFTER = 600.0  # seconds without a tick: a beat that is gone is dropped


def beat_report(role: str, since: float, sent_at: float | None = None) -> None:
    """This beat's role (``active`` or ``standby``) since ``since`` (epoch s), now."""
    report = {"host": MACHINE, "pid": os.getpid(), "role": role, "since": since,
              "tick": time.time(), "sent": sent_at}  # fmt: skip
    with redis.client().pipeline(transaction=False) as pipe:
        pipe.hset(BEATS_KEY, f"{MACHINE}:{os.getpid()}", json.dumps(report))
        pipe.expire(BEATS_KEY, int(BEAT_FORGOTTEN_AFTER))
        pipe.execute()


def beat_gone() -> None:
    """This beat stops: it is no longer listed."""
    redis.client().hdel(BEATS_KEY, f"{MACHINE}:{os.getpid()}")


def beats_reported(now: float | None = None) -> list[dict]:
    """The beats that reported within BEAT_FORGOTTEN_AFTER, the latest tick first."""
    now = time.time() if now is None else now
    try:
        raw = cast(dict[bytes, bytes], redis.client().hgetall(BEATS_KEY))
    except Exception as exc:  # Redis down: none known
        logger.warning("Could not read the beats' reports: %s", exc)
        return []
    found: list[dict] = []
    old: list[bytes] = []
    for name, value in raw.items():
        try:
            report = json.loads(value)
            fresh = now - float(report["tick"]) <= BEAT_FORGOTTEN_AFTER
        except (ValueError, KeyError, TypeError):
            fresh = False
        if fresh:
            found.append(report)
        else:
            old.append(name)
    if old:
        with contextlib.suppress(Exception):
            redis.client().hdel(BEATS_KEY, *old)
    return sorted(found, key=lambda r: -float(r["tick"]))


# --- Worker heartbeats ------------------------------------------------------------

WORKER_KEY = "jobsite:worker:{}"
WORKER_BEAT_SECONDS = 10.0
INCARNATION_KEY = "jobsite:worker:incarnation:{}"
INCARNATION_TTL = 3 * WORKER_BEAT_SECONDS  # three missed heartbeats: the incarnation is gone
MACHINE = socket.gethostname()


# Every worker name with the time of its last heartbeat (a sorted set): who should answer
# a remote-control call, so the pages wait for those replies and no longer (jobs.selectors
# .workers). Names silent for a week are pruned by the heartbeats themselves.
WORKERS_KEY = "jobsite:workers"
NAME_KEPT_SECONDS = 7 * 24 * 3600


def worker_seen_now(hostname: str, instance: str = "") -> None:
    now = time.time()
    with redis.client().pipeline(transaction=False) as pipe:
        pipe.set(WORKER_KEY.format(hostname), f"{now:.3f}", ex=NAME_KEPT_SECONDS)
        pipe.zadd(WORKERS_KEY, {hostname: now})
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - NAME_KEPT_SECONDS)
        if instance:
            pipe.set(INCARNATION_KEY.format(instance), MACHINE, ex=int(INCARNATION_TTL))
        pipe.execute()


def incarnation_seen_now(instance: str) -> None:
    """Before a worker's pool starts: its processes may hold runs from their first one."""
    redis.client().set(INCARNATION_KEY.format(instance), MACHINE, ex=int(INCARNATION_TTL))


def holders_alive(holders: list[tuple[str, int]]) -> list[bool]:
    """Whether each (incarnation, process id) that holds a run still exists.

    Its incarnation's key must exist; on this machine, its process too (a whole worker
    SIGKILLed leaves its key for up to INCARNATION_TTL). One round trip for them all.
    """
    if not holders:
        return []
    keys = [INCARNATION_KEY.format(i) for i, _ in holders]
    machines = cast(list[bytes | None], redis.client().mget(keys))  # no decode_responses
    return [
        machine is not None and (machine.decode() != MACHINE or process_alive(pid))
        for (_, pid), machine in zip(holders, machines, strict=True)
    ]


def process_alive(pid: int) -> bool:
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


def worker_last_seen(hostnames: list[str]) -> dict[str, datetime | None]:
    if not hostnames:
        return {}
    raws = redis.client().mget([WORKER_KEY.format(h) for h in hostnames])
    return {
        h: datetime.fromtimestamp(float(raw), tz=UTC) if raw else None
        for h, raw in zip(hostnames, raws, strict=True)
    }


def workers_heard(within: float = INCARNATION_TTL) -> list[str]:
    """Names of the workers whose heartbeat came in the last ``within`` seconds, sorted.

    One that was SIGKILLed stays in the list until ``within`` has passed: callers wait
    for these replies, not for every one of them to come.
    """
    try:
        names = redis.client().zrangebyscore(WORKERS_KEY, time.time() - within, "+inf")
    except Exception as exc:  # Redis down: nobody known, the caller asks without a limit
        logger.warning("Could not read worker heartbeats: %s", exc)
        return []
    return sorted(name.decode() for name in cast(list[bytes], names))


# Workers that are not Jobsite's, as the event recorder hears them (their task events and
# heartbeats): they answer remote-control calls too, so the pages ask them as well.
FOREIGN_WORKERS_KEY = "jobsite:workers:foreign"


def foreign_workers_seen(seen: dict[str, float]) -> None:
    """Record when each of these workers (not Jobsite's) last sent an event."""
    if not seen:
        return
    with redis.client().pipeline(transaction=False) as pipe:
        pipe.zadd(FOREIGN_WORKERS_KEY, seen)
        pipe.zremrangebyscore(FOREIGN_WORKERS_KEY, "-inf", time.time() - NAME_KEPT_SECONDS)
        pipe.execute()


def workers_expected(within: float = INCARNATION_TTL) -> list[str]:
    """Every worker that should answer a remote-control call now, Jobsite's or not."""
    names = set(workers_heard(within))
    try:
        foreign = redis.client().zrangebyscore(FOREIGN_WORKERS_KEY, time.time() - within, "+inf")
    except Exception as exc:  # Redis down: Jobsite's own, as far as they are known
        logger.warning("Could not read foreign workers: %s", exc)
        foreign = []
    names.update(name.decode() for name in cast(list[bytes], foreign))
    return sorted(names)


def worker_gone(hostname: str) -> None:
    """A worker that stops cleanly leaves the heard names: no call waits for its reply."""
    redis.client().zrem(WORKERS_KEY, hostname)


def start_worker_heartbeat(hostname: str, instance: str = "") -> threading.Event:
    """A daemon thread in the worker's main process; returns the event that stops it.

    Each beat renews the worker's name and, given ``instance``, its incarnation.
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                worker_seen_now(hostname, instance)
            except Exception as exc:  # Redis down: try again next time
                logger.warning("Worker heartbeat not written: %s", exc)
            stop.wait(WORKER_BEAT_SECONDS)

    threading.Thread(target=beat, name="jobsite-heartbeat", daemon=True).start()
    return stop
