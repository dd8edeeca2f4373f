"""jobs/selectors/broker.py with the broker as others use it.

The queues listed (queues page, /metrics) are those the current broker has, and a
message a plain Celery client (kombu's defaults, priority 9) leaves in one of them is
counted in its depth, on Redis and on RabbitMQ.
"""

from __future__ import annotations

import time

import pytest
from celery import Celery
from django.core.cache import cache
from django.urls import reverse
from kombu import Exchange
from kombu.common import Broadcast
from prometheus_client.parser import text_string_to_metric_families

from jobs import routing
from jobs.selectors import broker
from jobsite.celery import app as celery_app
from tests.conftest import BROKERS, _reachable, service_unavailable, use_broker

pytestmark = pytest.mark.broker

POINT_TO_POINT = ("default", "reports", "cpu", "reports_emea", "reports_all")
HEADERS_ONLY = ("gpu_emea", "accelerated")  # RabbitMQ's headers exchange (jobs/routing.py)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request):
    url = BROKERS[request.param]
    if not _reachable(url):
        service_unavailable(f"{request.param} is not reachable at {url}")
    use_broker(url)
    cache.clear()  # /metrics caches its broker reads
    yield url
    cache.clear()
    use_broker(BROKERS["redis"])


def listed(admin_client) -> tuple[set[str], set[str]]:
    """The queues on the queues page, and those with a sample in /metrics."""
    page = admin_client.get(reverse("jobs-queues")).content.decode()
    on_page = {name for name in routing.ALL_QUEUE_NAMES if f'data-queue="{name}"' in page}
    metrics = admin_client.get(reverse("jobs-metrics")).content.decode()
    family = {f.name: f for f in text_string_to_metric_families(metrics)}
    in_metrics = {s.labels["queue"] for s in family["jobsite_queue_messages"].samples}
    return on_page, in_metrics


def test_only_the_queues_the_broker_has_are_listed(broker_url, admin_client):
    expected = set(POINT_TO_POINT)
    if routing.is_rabbitmq(broker_url):
        expected |= set(HEADERS_ONLY)

    assert {q.name for q in broker.queue_depths()} == expected
    assert listed(admin_client) == (expected, expected)


@pytest.mark.broker
def test_a_plain_clients_priority_message_counts_in_the_queue_depth(broker_url):
    watched = ("reports_emea", "reports_all")  # queues no test worker consumes
    with celery_app.connection_for_write() as conn:
        for queue in routing.queues_for(broker_url):  # as Jobsite's workers declare them
            if not isinstance(queue, Broadcast):
                queue.bind(conn.default_channel).declare()
        for name in watched:
            conn.default_channel.queue_purge(name)
    # kombu's defaults (its own Redis key layout); not made this process's current app.
    plain = Celery(broker=broker_url, set_as_current=False)
    try:
        # reports.topic routes "reports.<kind>.emea" to both queues. (Declared: kombu's
        # Redis transport takes an exchange it has not declared for a direct one.)
        topic = Exchange("reports.topic", type="topic")
        plain.send_task("jobs.noop", exchange=topic, routing_key="reports.x.emea", priority=9,
                        declare=[topic])  # fmt: skip
        deadline = time.monotonic() + 30
        while (depths := [q.messages for q in broker.queue_depths(watched)]) != [1, 1]:
            assert time.monotonic() < deadline, f"depths stayed {depths}"
            time.sleep(0.1)
    finally:
        with celery_app.connection_for_write() as conn:
            for name in watched:
                conn.default_channel.queue_purge(name)
        plain.close()
