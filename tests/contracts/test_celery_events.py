"""Contract: Celery's EventReceiver as the event recorder subclasses it (internals entry 76)."""

from __future__ import annotations

import inspect
import time

from celery import Celery
from celery.events.receiver import EventReceiver
from kombu import Connection, Queue


def _receiver() -> EventReceiver:
    app = Celery("contract", broker="memory://", set_as_current=False)
    return EventReceiver(Connection("memory://"), handlers={}, app=app, node_id="n",
                         queue_prefix="p")  # fmt: skip


def test_event_receiver_sets_its_queue_exchange_and_key_in_init_and_consumes_without_acks():
    receiver = _receiver()
    assert isinstance(receiver.queue, Queue) and receiver.queue.name == "p.n"
    assert receiver.exchange.name == "celeryev" and receiver.routing_key == "#"
    assert receiver.queue.auto_delete and not receiver.queue.durable
    assert "json" in receiver.accept
    assert list(inspect.signature(EventReceiver.get_consumers).parameters) == [
        "self", "Consumer", "channel"]  # fmt: skip
    made = {}

    def consumer(**kwargs):
        made.update(kwargs)
        return kwargs

    receiver.get_consumers(consumer, None)
    assert made["no_ack"] is True  # Celery's own: nothing kept for a killed receiver
    assert made["queues"] == [receiver.queue]


def test_event_from_message_returns_the_type_and_the_adjusted_event():
    receiver = _receiver()
    now = time.time()
    body = {"type": "task-succeeded", "uuid": "u", "timestamp": now, "utcoffset": 0,
            "clock": 3, "hostname": "w@h", "result": "1"}  # fmt: skip
    kind, event = receiver.event_from_message(dict(body))
    assert kind == "task-succeeded"
    assert event["uuid"] == "u" and abs(event["timestamp"] - now) < 1
    assert event["local_received"] > 0


def test_request_classes_keep_the_limits_they_were_made_with_until_strategies_are_rebuilt():
    """Internals entry 77: why jobsite_time_limit rebuilds the consumer's strategies."""
    from celery.worker import control as celery_control
    from celery.worker.consumer.consumer import Consumer
    from celery.worker.request import create_request_cls

    source = inspect.getsource(create_request_cls)
    assert "default_time_limit = task.time_limit" in source  # read once, when it is made
    assert "default_soft_time_limit = task.soft_time_limit" in source
    assert "timeout=time_limit or default_time_limit" in source
    parameters = list(inspect.signature(celery_control.time_limit).parameters)
    assert parameters[:4] == ["state", "task_name", "hard", "soft"]
    assert "start_strategy" in inspect.getsource(Consumer.update_strategies)
