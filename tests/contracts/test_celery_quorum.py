"""Celery 5.7.0 / kombu 5.7.0 native delayed delivery, as jobs/worker/quorum.py uses it.

Each test names, in docs/internals.md, the override it protects (entry 75).
"""

from __future__ import annotations

import inspect
from unittest import mock

from celery.worker.consumer import Consumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu import Exchange, Queue
from kombu.transport.native_delayed_delivery import bind_queue_to_native_delayed_delivery_exchange

from jobs import routing
from jobs.worker import quorum
from jobs.worker.consumer import JobsiteConsumer


def test_delayed_delivery_is_a_consumer_step_that_binds_every_queue_in__bind_queues():
    assert quorum.CELERY_STEP in Consumer.Blueprint.default_steps
    assert quorum.JOBSITE_STEP in JobsiteConsumer.Blueprint.default_steps
    assert quorum.CELERY_STEP not in JobsiteConsumer.Blueprint.default_steps
    assert list(inspect.signature(DelayedDelivery._bind_queues).parameters) == [
        "self", "app", "connection",
    ]  # fmt: skip
    setup = inspect.getsource(DelayedDelivery._setup_delayed_delivery)
    assert "self._bind_queues(c.app, connection)" in setup
    # Every queue of task_queues, consumed by this worker or not (hence queues_declare).
    assert "app.amqp.queues.values()" in inspect.getsource(DelayedDelivery._bind_queues)


def test_kombu_binds_a_headers_queue_to_its_exchange_without_its_header_arguments():
    """Still needed: the binding kombu adds would match every message on the exchange."""
    queue = Queue(
        "gpu_emea", Exchange("jobs.headers", type="headers"),
        binding_arguments={"x-match": "all", "gpu": "yes"},
    )  # fmt: skip
    connection = mock.MagicMock()
    channel = connection.channel.return_value

    bind_queue_to_native_delayed_delivery_exchange(connection, queue)

    (call,) = channel.queue_bind.call_args_list
    assert call.kwargs["exchange"] == "jobs.headers"
    assert call.kwargs["routing_key"] == "#."
    assert not call.kwargs.get("arguments")
    # Jobsite's step leaves such queues (and direct ones) out.
    assert {q.exchange.type for q in routing.HEADERS_QUEUES} == {"headers"}
