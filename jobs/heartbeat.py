"""Liveness marks in Redis: when beat last ticked, when each worker last said it lives."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

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


# --- Worker heartbeats ------------------------------------------------------------

WORKER_KEY = "jobsite:worker:{}"
WORKER_BEAT_SECONDS = 10.0


def worker_seen_now(hostname: str) -> None:
    redis.client().set(WORKER_KEY.format(hostname), f"{time.time():.3f}", ex=7 * 24 * 3600)


def worker_last_seen(hostnames: list[str]) -> dict[str, datetime | None]:
    if not hostnames:
        return {}
    raws = redis.client().mget([WORKER_KEY.format(h) for h in hostnames])
    return {
        h: datetime.fromtimestamp(float(raw), tz=UTC) if raw else None
        for h, raw in zip(hostnames, raws, strict=True)
    }


def start_worker_heartbeat(hostname: str) -> threading.Event:
    """A daemon thread in the worker's main process; returns the event that stops it."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                worker_seen_now(hostname)
            except Exception as exc:  # Redis down: try again next time
                logger.warning("Worker heartbeat not written: %s", exc)
            stop.wait(WORKER_BEAT_SECONDS)

    threading.Thread(target=beat, name="jobsite-heartbeat", daemon=True).start()
    return stop
