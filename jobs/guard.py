"""Per-run markers in Redis: cancelled runs and the duplicate-delivery guard.

A cancelled run's marker makes every worker skip it, whenever the message arrives and
whichever worker receives it (Celery's own revoke list lives in worker memory and
misses workers that were down when the revoke was broadcast).
"""

from __future__ import annotations

import functools

import redis
from django.conf import settings

REVOKED_TTL_MS = 7 * 24 * 3600 * 1000


@functools.cache
def client() -> redis.Redis:
    return redis.Redis.from_url(
        settings.JOBSITE_REDIS_URL, socket_connect_timeout=2, socket_timeout=5
    )


def _key(task_id: str) -> str:
    return f"jobsite:run:{task_id}"


def mark_revoked(task_id: str) -> None:
    client().set(_key(task_id), b"revoked", px=REVOKED_TTL_MS)


def is_revoked(task_id: str) -> bool:
    return client().get(_key(task_id)) == b"revoked"
