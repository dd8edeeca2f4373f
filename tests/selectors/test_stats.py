"""The dashboard's aggregates: percentiles in the database, every query
on an index (jobs.selectors.stats)."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs import heartbeat, redis
from jobs.models import Job
from jobs.selectors import stats


def test_percentiles_are_computed_in_the_database_and_match_the_python_fallback(alice, runs):
    timings = {t.name: t for t in stats.timings(user=alice)}

    primes = timings["Count primes"]
    assert primes.runs == 3  # runs started in the last 24 h
    assert primes.runtime_p50 == pytest.approx(2.0)
    assert primes.runtime_p95 == pytest.approx(2.9)  # percentile_cont: 2 + 0.9 * (3 - 2)
    assert primes.wait_p50 == pytest.approx(1.0)
    started = Job.objects.filter(created_at__gte=timezone.now() - timedelta(days=1))
    started = started.filter(started_at__isnull=False)
    in_database = sorted(stats._timings_in_database(started))
    in_python = sorted(stats._timings_from_sample(started))
    assert [row[:2] for row in in_database] == [row[:2] for row in in_python]
    for db_row, py_row in zip(in_database, in_python, strict=True):
        assert db_row[2:] == pytest.approx(py_row[2:])
    assert connection.vendor == "postgresql"


def test_every_dashboard_query_can_be_served_by_an_index(operator, alice, runs):
    with CaptureQueriesContext(connection) as queries:
        for user in (operator, alice):
            stats.runs_by_state(user=user)
            stats.throughput(user=user, period="minute")
            stats.throughput(user=user, period="hour")
            stats.timings(user=user)
            stats.failure_groups(user=user)
        stats.runs_by_type_and_state(since=timezone.now() - timedelta(days=1))
        stats.runtime_histogram(since=timezone.now() - timedelta(minutes=15), buckets=(1.0,))
    job_queries = [q["sql"] for q in queries if '"jobs_job"' in q["sql"]]

    assert len(job_queries) >= 14
    with connection.cursor() as cursor:
        # With sequential scans priced out, a plan that still scans the table has no index.
        cursor.execute("SET enable_seqscan = off")
        for sql in job_queries:
            cursor.execute("EXPLAIN " + sql)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert not re.search(r"Seq Scan on jobs_job\b", plan), plan
        cursor.execute("SET enable_seqscan = on")


# --- Workers online: never waited for ------------------------------------------------


@pytest.fixture
def slow_ping(monkeypatch):
    """A ping that takes as long as one waiting out a dead worker, and who answered it."""
    answered = ["live@host"]

    def ping():
        time.sleep(1.0)
        return list(answered)

    monkeypatch.setattr(stats, "workers_online", ping)
    saved = dict(redis.client().zrange(heartbeat.WORKERS_KEY, 0, -1, withscores=True))
    redis.client().delete(heartbeat.WORKERS_KEY)
    heartbeat.worker_seen_now("live@host")
    heartbeat.worker_seen_now("killed@host")
    yield answered
    # Names no worker answers to out, the real ones back: later tests' pages ask the
    # heard workers by name.
    redis.client().zrem(heartbeat.WORKERS_KEY, "live@host", "killed@host")
    if saved:
        redis.client().zadd(heartbeat.WORKERS_KEY, saved, nx=True)


@pytest.mark.broker
def test_the_system_status_does_not_wait_for_the_first_ping(slow_ping):
    started = time.monotonic()
    status = stats.system_status()

    assert time.monotonic() - started < 0.5
    assert status.workers == ["killed@host", "live@host"]  # the heartbeats, until it answers
    stats.workers_refresh_wait()
    assert stats.system_status().workers == ["live@host"]


@pytest.mark.broker
def test_a_stale_answer_is_shown_while_one_ping_refreshes_it(slow_ping, monkeypatch):
    stats.system_status()
    stats.workers_refresh_wait()
    slow_ping.append("new@host")
    monkeypatch.setattr(stats, "WORKERS_FRESH", 0.0)

    started = time.monotonic()
    first, second = stats.system_status(), stats.system_status()

    assert time.monotonic() - started < 0.5
    assert first.workers == second.workers == ["live@host"]
    assert stats.workers_refresh_in_background() is None  # the one ping is still running
    stats.workers_refresh_wait()
    assert stats.system_status().workers == ["live@host", "new@host"]
