"""Heartbeats: the worker names pages expect a reply from (jobs.heartbeat)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from jobs import heartbeat, redis
from jobs.worker import signals


def test_the_heard_workers_are_those_with_a_recent_heartbeat():
    client = redis.client()
    client.delete(heartbeat.WORKERS_KEY)
    heartbeat.worker_seen_now("b@host")
    heartbeat.worker_seen_now("a@host")
    client.zadd(heartbeat.WORKERS_KEY, {"old@host": time.time() - heartbeat.INCARNATION_TTL - 1})

    assert heartbeat.workers_heard() == ["a@host", "b@host"]
    assert "old@host" in heartbeat.workers_heard(within=heartbeat.INCARNATION_TTL + 60)


def test_a_worker_that_stops_cleanly_leaves_the_heard_names():
    redis.client().delete(heartbeat.WORKERS_KEY)
    heartbeat.worker_seen_now("stopping@host")
    heartbeat.worker_seen_now("staying@host")

    signals.on_worker_stopped(sender=SimpleNamespace(hostname="stopping@host"))

    assert heartbeat.workers_heard() == ["staying@host"]
