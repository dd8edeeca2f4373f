"""A small Celery app of its own, so the contracts never touch Jobsite's app or broker."""

from __future__ import annotations

import inspect

import pytest
from celery import Celery
from kombu import Message


@pytest.fixture
def app():
    app = Celery("contracts", set_as_current=False)
    app.conf.update(
        broker_url="memory://",
        result_backend="cache+memory://",
        result_extended=True,
        task_serializer="json",
        accept_content=["json"],
    )

    @app.task(name="contracts.add", shared=False)
    def add(x, y):
        return x + y

    @app.task(name="contracts.late", acks_late=True, shared=False)
    def late():
        return "done"

    app.finalize()
    yield app
    app.close()


def task_message(app, name: str, task_id: str = "run-1", args=(), kwargs=None, **headers):
    """A task message as the broker delivers it (protocol 2, JSON), on no channel."""
    proto = app.amqp.as_task_v2(task_id, name, args=args, kwargs=kwargs or {})
    payload, content_type, content_encoding = _encode(proto.body)
    return Message(
        body=payload,
        content_type=content_type,
        content_encoding=content_encoding,
        headers={**proto.headers, **headers},
        delivery_info={"routing_key": "default", "exchange": ""},
        delivery_tag="tag-1",
    )


def _encode(body):
    from kombu.serialization import dumps

    content_type, content_encoding, payload = dumps(body, serializer="json")
    return payload, content_type, content_encoding


def parameters(function) -> list[str]:
    """The parameter names of a function, in order (self included)."""
    return list(inspect.signature(function).parameters)
