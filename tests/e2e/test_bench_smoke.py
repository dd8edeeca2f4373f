"""The benchmarks (bench/) still run: each with tiny sizes, against the test services.

No figure is checked (no timed assertion): only that each benchmark completes and
prints its table. They run as the README says, as `python -m bench.<name>`, on the
test database and brokers, and on their own queue (`bench`), so they never take a
test worker's messages.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from django.db import connection

from tests.conftest import BROKERS, ROOT

pytestmark = pytest.mark.broker


@pytest.fixture
def bench_env(transactional_db, live_broker) -> dict[str, str]:
    for name in BROKERS:
        live_broker(name)
    db = connection.settings_dict
    return {
        **os.environ,
        "BENCH_DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "BENCH_REDIS_URL": BROKERS["redis"],
        "BENCH_RABBITMQ_URL": BROKERS["rabbitmq"],
        "BENCH_JOBSITE_REDIS_URL": os.environ["JOBSITE_REDIS_URL"],
    }


def run(env: dict, module: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_tracking_benchmark_runs_on_both_brokers(bench_env):
    out = run(bench_env, "tracking", "--broker", "both", "--jobs", "50")

    assert "### Tracking overhead: 50 no-op jobs" in out
    assert out.count("| redis") == 2
    assert out.count("| rabbitmq") == 2


def test_the_tracking_benchmark_alternates_rounds_and_reports_medians(bench_env):
    out = run(bench_env, "tracking", "--broker", "redis", "--jobs", "30", "--rounds", "2")

    assert out.count("| redis") == 6  # submit and drain: two rounds and a median each
    assert "drain (worker side), round 2" in out
    assert "drain (worker side), median" in out


def test_the_history_benchmark_runs(bench_env):
    out = run(bench_env, "history", "--runs", "2000", "--results", "2000", "--requests", "2",
              "--stock-requests", "1", "--follow", "3")  # fmt: skip

    assert "### History, search and dashboard" in out
    assert "| search: text in params" in out
    assert "### TaskResult admin changelist" in out


def test_the_submit_benchmark_runs(bench_env):
    out = run(bench_env, "submit", "--clients", "2", "--seconds", "1", "--bulk", "50",
              "--web-workers", "1", "--port", str(free_port()))  # fmt: skip

    assert "### Submit latency" in out
    assert "| POST /api/runs/bulk/" in out
    assert "### Memory" in out


def test_the_beat_benchmark_runs(bench_env):
    out = run(bench_env, "beat", "--schedules", "50", "--seconds", "3")

    assert "### Beat: 50 schedules" in out
    assert "| Jobsite (JobsiteScheduler)" in out
    assert "| stock (DatabaseScheduler)" in out


def test_the_fleet_benchmark_runs_with_one_live_and_one_killed_worker(bench_env):
    out = run(bench_env, "fleet", "--workers", "1", "--requests", "1")

    assert "1 workers ready and fleet-dead@bench killed" in out
    assert "### Pages with 1 workers and one killed" in out
    assert "| /metrics, uncached" in out


def test_the_latency_benchmark_runs_on_both_brokers(bench_env):
    out = run(bench_env, "latency", "--broker", "both", "--runs", "2", "--pause", "0")

    assert "### Idle latency: 2 no-op runs one at a time" in out
    assert out.count("| redis") == 9  # 4 steps in each of two modes, and raw Celery
    assert out.count("| rabbitmq") == 9
    assert "| finished -> stored" in out


def test_the_concurrency_benchmark_runs_on_both_brokers(bench_env):
    out = run(bench_env, "concurrency", "--broker", "both", "--clients", "1,2", "--seconds", "0.5")

    assert "### Single submits: concurrent client processes" in out
    assert out.count("| redis") == 2
    assert out.count("| rabbitmq") == 2


# The event recorder beside Flower's in-memory state (bench/events.py), a tiny stream:
# both consumers applied every event and the table has numbers.
def test_the_events_benchmark_runs_the_recorder_beside_flower_s_state(bench_env):
    done = subprocess.run(
        [sys.executable, "-m", "bench.events", "--broker", "redis", "--fast"],
        cwd=ROOT, env=bench_env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]

    assert "### Task events: 300 no-op tasks (900 task events)" in out
    assert "| recorder / Flower" in out
    for figure in ("events/s sustained", "lag after the last event (s)", "peak RSS, VmHWM"):
        row = next(line for line in out.splitlines() if f"| {figure}" in line)
        assert row.startswith("| redis")
        assert len(re.findall(r"\| [\d,.]+ ", row)) >= 2, row  # recorder and Flower figures
    applied = next(line for line in out.splitlines() if "| task events applied" in line)
    assert applied.count("900") == 2, applied
    assert "INCOMPLETE" not in out
