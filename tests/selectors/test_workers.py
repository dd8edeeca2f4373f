"""Workers through Celery's remote control: what the workers page and /metrics read."""

import time

import pytest

from jobs import heartbeat, redis
from jobs.selectors import workers

pytestmark = pytest.mark.broker


def test_a_live_worker_reports_its_pool_queues_and_tasks(worker):
    (info,) = [w for w in workers.workers_inspect() if w.name.startswith(f"test-{worker.broker}@")]

    assert info.pool == "prefork" and info.concurrency == worker.concurrency
    assert "default" in info.queues
    assert "jobs.count_primes" in info.registered  # answered by the addressed follow-up calls
    assert info.active == [] and info.uptime is not None


def test_the_follow_up_calls_ask_exactly_the_workers_that_answered(worker, monkeypatch):
    from celery import current_app

    asked = []
    real = current_app.control.inspect

    def spy(*args, **kwargs):
        asked.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(current_app.control, "inspect", spy)
    found = workers.workers_inspect()

    # Discovery asks the workers heartbeats and events name (everyone if none is known).
    assert asked[0].get("destination") == (heartbeat.workers_expected() or None)
    names = sorted(w.name for w in found)
    assert asked[1]["destination"] == names and asked[1]["limit"] == len(names)


# --- Replies expected from heartbeats ------------------------------------------------


@pytest.fixture(autouse=True)
def _heard_names_restored():
    """The tests below set the heard names; later tests' pages ask the workers by them."""
    client = redis.client()
    saved = dict(client.zrange(heartbeat.WORKERS_KEY, 0, -1, withscores=True))
    yield
    client.zrem(heartbeat.WORKERS_KEY, "killed@nowhere")  # no worker answers to it
    if saved:  # the real names the test dropped (their next heartbeats refresh them)
        client.zadd(heartbeat.WORKERS_KEY, saved, nx=True)


def _heard_only(*names: str) -> None:
    """The heartbeats name exactly these workers (both brokers' test workers beat)."""
    redis.client().delete(heartbeat.WORKERS_KEY)
    for name in names:
        heartbeat.worker_seen_now(name)


def _live_name(worker) -> str:
    from celery import current_app

    # Everyone who answers, whatever the heartbeats say (another test may have set them).
    online = [name for reply in current_app.control.ping(timeout=2) for name in reply]
    (name,) = [n for n in online if n.startswith(f"test-{worker.broker}@")]
    return name


def test_a_ping_returns_once_the_workers_heartbeats_name_have_answered(worker):
    name = _live_name(worker)
    _heard_only(name)

    started = time.monotonic()
    online = workers.workers_online(timeout=5)

    assert name in online
    assert time.monotonic() - started < 1.0  # not the 5 s timeout


def test_a_dead_name_in_the_heartbeats_costs_one_timeout_on_the_workers_page(worker):
    name = _live_name(worker)
    _heard_only(name, "killed@nowhere")

    started = time.monotonic()
    found = workers.workers_inspect(timeout=1.0)
    took = time.monotonic() - started

    assert [w.name for w in found] == [name]
    assert 0.9 < took < 1.6  # discovery waits for the dead one; the follow-ups do not


def test_the_workers_page_shares_one_inspection_until_an_action_forgets_it(monkeypatch):
    calls = []
    monkeypatch.setattr(workers, "workers_inspect", lambda: calls.append(1) or [])

    workers.workers_inspect_cached()
    workers.workers_inspect_cached()
    workers.workers_forget()
    workers.workers_inspect_cached()

    assert len(calls) == 2


def test_a_worker_heard_through_events_is_asked_too(worker):
    name = _live_name(worker)
    _heard_only(name)
    redis.client().delete(heartbeat.FOREIGN_WORKERS_KEY)
    heartbeat.foreign_workers_seen({"billing@elsewhere": time.time(), "old@gone": 1.0})
    try:
        assert heartbeat.workers_expected() == sorted([name, "billing@elsewhere"])
    finally:
        redis.client().delete(heartbeat.FOREIGN_WORKERS_KEY)
