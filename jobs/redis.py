"""The one Redis client of Jobsite's own keys (JOBSITE_REDIS_URL): markers, heartbeats,
alert marks, paused queues. Celery's broker and result connections are Celery's own."""

from __future__ import annotations

import functools

import redis
from django.conf import settings


@functools.cache
def client() -> redis.Redis:
    return redis.Redis.from_url(
        settings.JOBSITE_REDIS_URL, socket_connect_timeout=2, socket_timeout=5
    )
