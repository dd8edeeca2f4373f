"""The worker's consumer: acknowledgements of a stored batch go out
inline (jobs.worker.consumer)."""

from __future__ import annotations

from types import SimpleNamespace

from jobs.worker import commit


def test_a_stored_batch_is_acknowledged_inline_by_the_consumer(monkeypatch):
    from jobs.worker.consumer import JobsiteConsumer

    consumer = JobsiteConsumer.__new__(JobsiteConsumer)  # call_soon_ack needs only .hub
    scheduled: list = []
    consumer.hub = SimpleNamespace(call_soon=scheduled.append)
    acked: list[str] = []

    monkeypatch.setattr(commit, "_committer", SimpleNamespace(acking=True))
    consumer.call_soon_ack(acked.append, "in the batch")
    monkeypatch.setattr(commit, "_committer", SimpleNamespace(acking=False))
    consumer.call_soon_ack(acked.append, "any other")

    assert acked == ["in the batch"]  # at once, inside redis_acks_pipelined
    assert len(scheduled) == 1  # Celery's way: on the event loop's next turn
