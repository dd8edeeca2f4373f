"""Liveness marks in Redis: when beat last ticked."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from jobs import guard

BEAT_KEY = "jobsite:beat:last_seen"


def beat_seen_now() -> None:
    guard.client().set(BEAT_KEY, f"{time.time():.3f}", ex=24 * 3600)


def beat_last_seen() -> datetime | None:
    try:
        raw = guard.client().get(BEAT_KEY)
    except Exception:  # Redis down: unknown, not an error page
        return None
    return datetime.fromtimestamp(float(raw), tz=UTC) if raw else None
