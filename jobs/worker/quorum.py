"""Quorum queues in the worker (JOBSITE_QUEUE_TYPE=quorum): declarations and delays.

Celery's native delayed delivery (countdown, ETA) binds every queue of ``task_queues``
to its delay exchanges when the worker starts, not only the queues the worker
consumes: each queue and its exchange must exist by then, or the whole setup fails
("Native delayed delivery will not be available") and a countdown run waits in the
worker instead. ``queues_declare`` declares them all first, with the dead-letter queue.

kombu binds a queue to the delay exchange through the queue's own exchange, with the
routing key ``#.<key>`` and no binding arguments. On a headers exchange a binding
without arguments matches every message, so a headers-routed queue would receive all
that exchange's messages: ``JobsiteDelayedDelivery`` leaves headers queues out (a
headers-routed run with a countdown is refused at submit instead, see
jobs.routing.route_options).
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu import Connection
from kombu.common import Broadcast
from kombu.transport.native_delayed_delivery import bind_queue_to_native_delayed_delivery_exchange

from jobs import routing

logger = logging.getLogger(__name__)

# Celery's consumer step, replaced in JobsiteConsumer's blueprint.
CELERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
JOBSITE_STEP = "jobs.worker.quorum:JobsiteDelayedDelivery"


def queues_declare(app: Celery) -> None:
    """Every point-to-point queue (and its exchange), and the dead-letter queue."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in app.amqp.queues.values():
            if not isinstance(queue, Broadcast):
                queue(channel).declare()
        # RabbitMQ drops a message dead-lettered to an exchange that does not exist,
        # and no worker consumes this queue, so Celery would never declare it.
        routing.dead_letter_queue()(channel).declare()


class JobsiteDelayedDelivery(DelayedDelivery):
    """Celery's step, binding only the queues a delay can reach without a header match."""

    def _bind_queues(self, app: Celery, connection: Connection) -> None:
        for queue in app.amqp.queues.values():
            if isinstance(queue, Broadcast) or queue.exchange.type in ("direct", "headers"):
                continue  # kombu skips direct exchanges itself (with a warning)
            bind_queue_to_native_delayed_delivery_exchange(connection, queue)
