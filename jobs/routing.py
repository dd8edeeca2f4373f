"""Queues and exchanges.

Every queue is declared with ``x-max-priority`` so that priorities work on RabbitMQ;
on Redis, kombu emulates priorities with sub-queues (see CELERY_BROKER_TRANSPORT_OPTIONS).
A worker started without ``-Q`` consumes all of these.
"""

from kombu import Exchange, Queue

MAX_PRIORITY = 10

default_exchange = Exchange("default", type="direct")


def _direct(name: str) -> Queue:
    return Queue(
        name,
        default_exchange,
        routing_key=name,
        queue_arguments={"x-max-priority": MAX_PRIORITY},
    )


QUEUES = (_direct("default"), _direct("reports"), _direct("cpu"))
QUEUE_NAMES = tuple(q.name for q in QUEUES)
