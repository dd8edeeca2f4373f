"""Quorum queues (JOBSITE_QUEUE_TYPE=quorum) on a real RabbitMQ node.

A private node (tests/e2e/servers.py), not the shared server: a vhost's queues keep the
type they were first declared with, and the other RabbitMQ tests declare the same
names as classic queues on the shared vhost. The node gets a vhost named after the
test's own (TEST_RABBITMQ_URL), so `rabbitmqctl -n <node> list_queues -p <vhost>
name type` reads like the shared one. A real worker runs with JOBSITE_QUEUE_TYPE=quorum;
this process (the web side) is switched to the same queues.

Asserted: Jobsite's queues, the dead-letter queue and Celery's delay queues are quorum
queues; a run and a countdown run execute (the countdown run waits in RabbitMQ's delay
queues, not in the worker); a message returned more than the delivery limit, and a
message Celery refuses, land in the dead-letter queue.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from django.utils import timezone
from kombu import Connection, Producer, Queue
from kombu.transport.native_delayed_delivery import MAX_LEVEL, level_name

from jobs import routing, services
from jobs.models import JobState
from jobsite.celery import app as celery_app
from tests.conftest import BROKERS, Worker, service_unavailable, use_broker, wait_for
from tests.e2e.servers import PrivateRabbitMQ

pytestmark = pytest.mark.broker

DELIVERY_LIMIT = 2
# The Debian wrapper (/usr/sbin/rabbitmqctl) runs as the rabbitmq user, with its cookie.
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
VHOST = urlsplit(BROKERS["rabbitmq"]).path.lstrip("/") or "jobsite"


@pytest.fixture(scope="module")
def node():
    server = PrivateRabbitMQ()
    if not server.available():
        service_unavailable(f"no {server.what} binary to start a private RabbitMQ node")
    try:
        server.start()
        server.url = f"amqp://guest:guest@127.0.0.1:{server.port}/{VHOST}"
        ctl(server, "add_vhost", VHOST)
        ctl(server, "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
        yield server
    finally:
        server.remove()


def ctl(server: PrivateRabbitMQ, *args: str) -> str:
    done = subprocess.run(
        [CTL, "-q", "-n", server.node, *args],
        env=server.environment(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if done.returncode:
        raise AssertionError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


def queue_rows(server: PrivateRabbitMQ, *columns: str) -> dict[str, list[str]]:
    out = ctl(server, "list_queues", "-p", VHOST, "--no-table-headers", "name", *columns)
    return {row.split("\t")[0]: row.split("\t")[1:] for row in out.splitlines() if row}


@pytest.fixture(scope="module")
def _quorum_worker(node, _workers):
    worker = Worker(
        "rabbitmq", node.url, _workers.db_url, name="quorum",
        extra_env={"JOBSITE_QUEUE_TYPE": "quorum",
                   "JOBSITE_DELIVERY_LIMIT": str(DELIVERY_LIMIT)},
    )  # fmt: skip
    worker.start()
    yield worker
    worker.stop()


@contextlib.contextmanager
def quorum_web_side(url: str):
    """This process publishes as a web process started with JOBSITE_QUEUE_TYPE=quorum."""
    conf = celery_app.conf
    saved = {
        "task_queues": conf.task_queues,
        "broker_transport_options": conf.broker_transport_options,
        "task_default_exchange_type": conf.task_default_exchange_type,
        "task_queue_max_priority": conf.task_queue_max_priority,
    }
    use_broker(url)
    conf.task_queues = routing.queues_for(url, "quorum", DELIVERY_LIMIT)
    conf.broker_transport_options = {**saved["broker_transport_options"], "confirm_publish": True}
    conf.task_default_exchange_type = "topic"
    conf.task_queue_max_priority = None
    renew_queues()
    try:
        yield
    finally:
        conf.update(saved)
        renew_queues()
        use_broker(BROKERS["redis"])


def renew_queues() -> None:
    # Both are cached: the declarations, and the router holding them (send_task).
    celery_app.amqp.queues = celery_app.conf.task_queues
    celery_app.amqp.router = celery_app.amqp.Router()


@pytest.fixture
def quorum_worker(_quorum_worker, node, transactional_db):
    if _quorum_worker.process.poll() is not None:
        pytest.fail(f"the quorum worker died:\n{_quorum_worker.output()}")
    with quorum_web_side(node.url):
        yield _quorum_worker


def wait_until(check, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def dead_letters(url: str) -> list:
    """Every message in the dead-letter queue (read and acknowledged)."""
    with Connection(url) as conn:
        queue = routing.dead_letter_queue()(conn.default_channel)
        messages = []
        while (message := queue.get()) is not None:
            message.ack()
            messages.append(message)
        return messages


def test_jobsite_declares_its_queues_as_quorum_queues(quorum_worker, node):
    types = {name: row[0] for name, row in queue_rows(node, "type").items()}

    for name in ("default", "reports", "cpu", routing.DEAD_LETTER_QUEUE, "celery_delayed_0"):
        assert types.get(name) == "quorum", (name, types)
    # Per-consumer QoS: a quorum queue refuses the global basic.qos Celery sends otherwise.
    assert "Global QoS is disabled" in quorum_worker.output()


def test_a_run_and_a_countdown_run_execute(quorum_worker, node, alice, granted):
    job = services.job_submit(job_type=granted["count_primes"], params={"limit": 1000}, user=alice)
    assert wait_for(job.pk).state == JobState.SUCCESS

    now = timezone.now()
    job = services.job_submit(
        job_type=granted["count_primes"], params={"limit": 1000}, user=alice,
        options={"countdown": 4},
    )  # fmt: skip

    # It waits in RabbitMQ's delay queues (native delayed delivery), not in the worker.
    def delayed() -> int:
        with Connection(node.url) as conn:
            channel = conn.default_channel
            return sum(
                channel.queue_declare(level_name(level), passive=True).message_count
                for level in range(MAX_LEVEL + 1)
            )

    wait_until(lambda: delayed() == 1, timeout=3, what="the run in a celery_delayed_* queue")
    job = wait_for(job.pk, timeout=30)
    assert job.state == JobState.SUCCESS
    assert job.started_at >= now + timedelta(seconds=4)
    assert delayed() == 0


def test_a_retry_with_a_countdown_goes_through_the_delay_queues(quorum_worker, alice, granted):
    job = services.job_submit(
        job_type=granted["flaky"],
        params={"mode": "retry", "failures": 1, "message": "once", "fail_until": None},
        user=alice,
    )

    job = wait_for(job.pk, timeout=30)
    assert job.state == JobState.SUCCESS, quorum_worker.output()
    assert job.result == {"attempts": 2}


def test_a_message_returned_more_than_the_delivery_limit_is_dead_lettered(quorum_worker, node):
    name = f"test-poison-{uuid.uuid4().hex[:8]}"
    dead_letters(node.url)  # start from an empty dead-letter queue
    with Connection(node.url) as conn:
        queue = Queue(name, queue_arguments=routing.queue_arguments("quorum", DELIVERY_LIMIT))
        queue = queue(conn.default_channel)
        queue.declare()
        Producer(conn.default_channel).publish({"poison": name}, routing_key=name)
        # A worker that dies on it every time returns it; rejecting with requeue is the same.
        deliveries, deadline = 0, time.monotonic() + 10
        while deliveries <= DELIVERY_LIMIT and time.monotonic() < deadline:
            if (message := queue.get()) is None:
                time.sleep(0.05)  # the requeued message is on its way back
                continue
            deliveries += 1
            message.reject(requeue=True)
        dead = wait_until(lambda: dead_letters(node.url), timeout=10, what="a dead letter")
        assert queue.get() is None
        queue.delete()

    assert deliveries == DELIVERY_LIMIT + 1
    assert [m.payload for m in dead] == [{"poison": name}]
    assert dead[0].headers["x-death"][0]["reason"] == "delivery_limit"


def test_a_message_celery_refuses_is_dead_lettered_not_dropped(quorum_worker, node):
    dead_letters(node.url)
    celery_app.send_task("jobs.tasks.no_such_task", queue="default")

    dead = wait_until(lambda: dead_letters(node.url), timeout=20, what="a dead letter")
    assert dead[0].headers["task"] == "jobs.tasks.no_such_task"
    assert dead[0].headers["x-death"][0]["reason"] == "rejected"


def test_a_headers_queue_still_gets_only_the_messages_its_binding_matches(quorum_worker, node):
    # kombu's delayed-delivery binding carries no header arguments: on a headers exchange
    # it would match every message (jobs.worker.quorum leaves those queues out).
    with Connection(node.url) as conn:
        channel = conn.default_channel
        for name in ("gpu_emea", "accelerated"):
            channel.queue_purge(name)
        Producer(channel).publish(
            {"probe": 1}, exchange=routing.headers_exchange,
            headers={"gpu": "no", "region": "amer", "lane": "express"},
        )  # fmt: skip

        def count(name: str) -> int:
            return channel.queue_declare(name, passive=True).message_count

        wait_until(lambda: count("accelerated") == 1, timeout=5, what="the express message")
        assert count("gpu_emea") == 0
        channel.queue_purge("accelerated")
