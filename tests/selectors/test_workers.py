"""Workers through Celery's remote control: what the workers page and /metrics read."""

import pytest

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

    assert asked[0].get("destination") is None  # discovery: whoever answers
    names = sorted(w.name for w in found)
    assert asked[1]["destination"] == names and asked[1]["limit"] == len(names)
