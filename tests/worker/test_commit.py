"""Group commit: the worker's main process stores successful runs' final states in
batches, and acknowledges acks_late runs only once theirs is durable (jobs.worker.commit)."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
import uuid
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import psycopg
import pytest
import redis
from celery.app.task import Context
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_celery_results.models import TaskResult

from jobs import services
from jobs.models import Job
from jobs.worker import backend as backends
from jobs.worker import commit
from jobsite.celery import app
from tests.conftest import BROKERS, Worker, _reachable, service_unavailable, use_broker, wait_for

QUEUE = "bench"  # a queue noop may use, that no session worker consumes


# --- The pool process's side, and one batch (no worker) ------------------------------


def request_for(task_id: str, **extra) -> Context:
    fields = {"task": "jobs.noop", "hostname": "w1@host", "args": [], "kwargs": {},
              "delivery_info": {"routing_key": "default"}}  # fmt: skip
    return Context(id=task_id, **{**fields, **extra})


def started_job(user, state: str = "STARTED") -> Job:
    return Job.objects.create(id=str(uuid.uuid4()), task_name="jobs.noop", state=state,
                              submitted_by=user)  # fmt: skip


def queued(run_id: str, *, received: float | None = None) -> SimpleNamespace:
    """What the main process holds of a finished run: its Celery request."""
    request_dict = {"id": run_id, "task": "jobs.noop", "hostname": "w1@host", "args": [],
                    "kwargs": {}, "argsrepr": "()", "kwargsrepr": "{}"}  # fmt: skip
    if received:
        request_dict["jobsite_received_at"] = received
    return SimpleNamespace(id=run_id, request_dict=request_dict)


def test_a_deferred_success_is_left_to_the_main_process(db, alice):
    job = started_job(alice)

    with CaptureQueriesContext(connection) as queries:
        app.backend.mark_as_done(job.pk, {"n": 1}, request=request_for(job.pk, jobsite_defer=True))

    assert len(queries) == 0
    assert job.pk in backends.DEFERRED  # for the tracer to hand the result over
    backends.DEFERRED.discard(job.pk)
    assert Job.objects.get(pk=job.pk).state == "STARTED"
    assert not TaskResult.objects.filter(task_id=job.pk).exists()


@pytest.mark.parametrize("made", ["result file", "child tasks"])
def test_a_success_only_the_pool_process_knows_all_of_is_stored_there(db, alice, made):
    job = started_job(alice)
    request = request_for(job.pk, jobsite_defer=True)
    if made == "result file":
        request.jobsite_result_file = "results/x/out.csv"
    else:
        request.children.append(app.AsyncResult("c1"))  # as apply_async in the run does

    app.backend.mark_as_done(job.pk, {"n": 1}, request=request)

    assert job.pk not in backends.DEFERRED
    assert Job.objects.get(pk=job.pk).state == "SUCCESS"
    assert TaskResult.objects.get(task_id=job.pk).status == "SUCCESS"


def test_failures_are_never_deferred(db, alice):
    job = started_job(alice)

    request = request_for(job.pk, jobsite_defer=True)
    app.backend.mark_as_failure(job.pk, ValueError("no"), request=request)

    assert Job.objects.get(pk=job.pk).state == "FAILURE"


def test_a_batch_is_one_statement_for_every_run_and_leaves_final_rows_alone(db, alice):
    jobs = [started_job(alice) for _ in range(5)]
    cancelled = started_job(alice, state="REVOKED")
    now = time.time()
    batch = [(queued(job.pk, received=now - 3), {"i": i}, now - 2, now - 1, True)
             for i, job in enumerate(jobs)]  # fmt: skip
    batch.append((queued(jobs[0].pk, received=now - 3), {"i": 0}, now - 2, now - 1, True))  # twice
    batch.append((queued(cancelled.pk), {"late": True}, now - 2, now - 1, True))

    with CaptureQueriesContext(connection) as queries:
        commit.store(batch)

    assert len(queries) == 1
    for i, job in enumerate(jobs):
        job.refresh_from_db()
        assert (job.state, job.result, job.worker) == ("SUCCESS", {"i": i}, "w1@host")
        assert job.received_at < job.started_at < job.finished_at
        stored = TaskResult.objects.get(task_id=job.pk)
        assert (stored.status, stored.task_name) == ("SUCCESS", "jobs.noop")
        assert stored.worker == "w1@host"
        assert app.backend.get_task_meta(job.pk)["result"] == {"i": i}
    cancelled.refresh_from_db()
    assert (cancelled.state, cancelled.result) == ("REVOKED", None)
    assert not TaskResult.objects.filter(task_id=cancelled.pk).exists()


class _Hub:
    def call_later(self, *args):
        pass

    def call_soon(self, callback, *args):
        callback(*args)


def test_a_result_the_database_refuses_fails_its_run_alone(transactional_db, alice):
    good, bad = started_job(alice), started_job(alice)
    committer = commit.GroupCommit(SimpleNamespace(hub=_Hub(), qos=None))
    now = time.time()
    try:
        # PostgreSQL's jsonb refuses the NUL character: the batch is refused whole.
        stored = committer._store([
            (queued(good.pk), {"ok": 1}, now, now, False),
            (queued(bad.pk), {"text": "a\x00b"}, now, now, False),
        ])  # fmt: skip
    finally:
        committer.close()

    assert stored
    good.refresh_from_db()
    bad.refresh_from_db()
    assert (good.state, good.result) == ("SUCCESS", {"ok": 1})
    assert bad.state == "FAILURE"
    assert "Result could not be stored" in bad.error_message


def test_runs_finishing_close_together_are_stored_in_one_statement(
    transactional_db, alice, settings, monkeypatch
):
    settings.JOBSITE_GROUP_COMMIT_WAIT_MS = 300  # wide: no scheduler delay splits the batch
    batches: list[int] = []
    monkeypatch.setattr(commit, "store", lambda batch: batches.append(len(batch)))
    committer = commit.GroupCommit(SimpleNamespace(hub=_Hub(), qos=None))
    now = time.time()
    try:
        first, *rest = [started_job(alice) for _ in range(4)]
        committer.add((queued(first.pk), {}, now, now, False))  # alone: stored at once
        for job in rest:
            time.sleep(0.03)  # finishing a little apart, as runs do
            committer.add((queued(job.pk), {}, now, now, False))
        deadline = time.monotonic() + 5
        while len(batches) < 2:
            assert time.monotonic() < deadline, "the batch was never stored"
            time.sleep(0.01)
    finally:
        committer.close()

    assert batches == [1, 3]  # without the wait, each run after the first goes alone too


def test_a_lone_run_is_stored_without_waiting_for_a_batch(
    transactional_db, alice, settings, monkeypatch
):
    settings.JOBSITE_GROUP_COMMIT_WAIT_MS = 1000
    stored_after: list[float] = []
    monkeypatch.setattr(commit, "store", lambda batch: stored_after.append(time.monotonic()))
    committer = commit.GroupCommit(SimpleNamespace(hub=_Hub(), qos=None))
    now = time.time()
    try:
        for number in range(2):  # after the start, and after a quiet gather window
            added = time.monotonic()
            committer.add((queued(started_job(alice).pk), {}, now, now, False))
            deadline = added + 5
            while len(stored_after) <= number:
                assert time.monotonic() < deadline, "the run was never stored"
                time.sleep(0.005)
            assert stored_after[-1] - added < 0.5  # not the gather window's full second
            time.sleep(1.05)
    finally:
        committer.close()

    assert len(stored_after) == 2


@pytest.mark.broker
def test_a_batch_of_redis_acknowledgements_is_one_pipeline(live_broker):
    import kombu

    url = live_broker("redis")
    client = redis.Redis.from_url(url)
    queue = kombu.Queue(f"test-acks-{uuid.uuid4().hex[:8]}")
    with kombu.Connection(url) as conn:
        channel = conn.channel()
        bound = queue(channel)
        bound.declare()
        try:
            producer = kombu.Producer(channel, routing_key=queue.name)
            for i in range(4):
                producer.publish({"i": i}, serializer="json")
            messages = [bound.get(no_ack=False) for _ in range(4)]
            tags = [message.delivery_tag for message in messages]
            assert all(client.hexists("unacked", tag) for tag in tags)

            with commit.redis_acks_pipelined(channel):
                for message in messages[:3]:
                    message.ack()
                # Queued, not sent: still unacknowledged in Redis.
                assert all(client.hexists("unacked", tag) for tag in tags[:3])
            assert not any(client.hexists("unacked", tag) for tag in tags[:3])
            assert not any(client.zscore("unacked_index", tag) for tag in tags[:3])
            assert all(message.acknowledged for message in messages[:3])

            messages[3].ack()  # outside: kombu's own ack again, at once
            assert not client.hexists("unacked", tags[3])
        finally:
            bound.delete()


# --- A real worker: the ack waits for the durable write ----------------------------


@contextlib.contextmanager
def task_results_locked(db_url: str):
    """Hold off every TaskResult write, so a batch's statement waits, as on a slow disk."""
    with psycopg.connect(db_url, autocommit=False) as blocker:
        blocker.execute('LOCK TABLE "django_celery_results_taskresult" IN EXCLUSIVE MODE')
        try:
            yield blocker
        finally:
            blocker.rollback()


def unacked(worker: Worker) -> int:
    """Messages the broker has delivered to the worker and not yet had acknowledged."""
    if worker.broker == "redis":
        return redis.Redis.from_url(worker.url).hlen("unacked")
    return _rabbitmq_count("messages_unacknowledged")


def ready(worker: Worker) -> int:
    """Messages waiting in the queue."""
    if worker.broker == "redis":
        client = redis.Redis.from_url(worker.url)
        # kombu keeps one list per priority step: "bench", "bench\x06\x163", ...
        return sum(client.llen(key) for key in client.scan_iter(f"{QUEUE}*"))
    return _rabbitmq_count("messages_ready")


def _rabbitmq_count(column: str) -> int:
    # The test broker's own vhost: another suite on this RabbitMQ uses another one.
    vhost = unquote(urlsplit(BROKERS["rabbitmq"]).path[1:]) or "/"
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost, "-q", "name", column],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    match = re.search(rf"^{QUEUE}\s+(\d+)$", out, re.MULTILINE)
    return int(match.group(1)) if match else 0


def wait_acknowledged(worker: Worker, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while unacked(worker):
        assert time.monotonic() < deadline, "not acknowledged once stored"
        time.sleep(0.2)


def finished_in_pool(worker: Worker, run_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while f"[{run_id}] succeeded" not in worker.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.1)


@pytest.fixture
def commit_worker(worker, _workers):
    """A worker of its own (on each broker), so that a test may stop or kill it."""
    own = Worker(worker.broker, worker.url, _workers.db_url, name=f"test-{worker.broker}-commit",
                 queues=QUEUE)  # fmt: skip
    own.start()
    yield own
    own.stop()


def submit_noop(user, job_types, n: int = 1) -> list[Job]:
    return [services.job_submit(job_type=job_types["noop"], params={}, user=user,
                                options={"queue": QUEUE}) for _ in range(n)]  # fmt: skip


@pytest.mark.broker
def test_runs_are_stored_by_the_main_process_and_acknowledged_after(
    commit_worker, _workers, alice, granted
):
    runs = submit_noop(alice, granted, 20)
    done = [wait_for(run.id) for run in runs]

    assert [run.state for run in done] == ["SUCCESS"] * 20
    assert all(run.result == {} and run.started_at and run.finished_at for run in done)
    stored = TaskResult.objects.filter(task_id__in=[r.id for r in runs], status="SUCCESS")
    assert stored.count() == 20
    assert "Final states are group-committed by the main process" in commit_worker.log.read_text()

    with task_results_locked(_workers.db_url):
        (run,) = submit_noop(alice, granted)
        finished_in_pool(commit_worker, run.id)
        time.sleep(0.5)
        # The run is over, its state is not stored yet: so its message is not acknowledged.
        assert Job.objects.get(pk=run.id).state != "SUCCESS"
        assert unacked(commit_worker) == 1
    assert wait_for(run.id, timeout=10).state == "SUCCESS"
    wait_acknowledged(commit_worker)


@pytest.fixture
def rabbitmq_commit_worker(_workers, transactional_db):
    """On RabbitMQ, which gives a dead consumer's unacknowledged messages back at once."""
    url = BROKERS["rabbitmq"]
    if not _reachable(url):
        service_unavailable(f"RabbitMQ is not reachable at {url}")
    own = Worker("rabbitmq", url, _workers.db_url, name="test-rabbitmq-commit", queues=QUEUE)
    own.start()
    use_broker(url)
    yield own
    own.stop()
    use_broker(BROKERS["redis"])


@pytest.mark.broker
def test_a_worker_killed_before_the_write_leaves_the_run_to_be_delivered_again(
    rabbitmq_commit_worker, _workers, alice, granted
):
    commit_worker = rabbitmq_commit_worker
    with task_results_locked(_workers.db_url):
        (run,) = submit_noop(alice, granted)
        finished_in_pool(commit_worker, run.id)
        commit_worker.kill()  # the main process dies with the run's state unstored
        assert Job.objects.get(pk=run.id).state != "SUCCESS"
    # (The dead worker's statement, already on the server, may still complete now.)

    commit_worker.start()  # RabbitMQ gave the unacknowledged message back: it runs again
    finished_in_pool(commit_worker, run.id)  # (the log starts afresh with the worker)
    assert wait_for(run.id, timeout=30).state == "SUCCESS"
    wait_acknowledged(commit_worker)


@pytest.mark.broker
def test_a_warm_shutdown_stores_and_acknowledges_what_is_pending(
    commit_worker, _workers, alice, granted
):
    with task_results_locked(_workers.db_url):
        runs = submit_noop(alice, granted, 3)
        for run in runs:
            finished_in_pool(commit_worker, run.id)
        commit_worker.process.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert commit_worker.process.poll() is None  # waiting for its final states
    commit_worker.process.wait(timeout=30)

    assert [Job.objects.get(pk=r.id).state for r in runs] == ["SUCCESS"] * 3
    assert unacked(commit_worker) == 0
    assert ready(commit_worker) == 0  # none went back to the queue, to run again


@pytest.mark.broker
def test_a_lost_database_connection_is_retried_and_nothing_is_acknowledged_meanwhile(
    commit_worker, _workers, alice, granted
):
    with task_results_locked(_workers.db_url) as blocker:
        (run,) = submit_noop(alice, granted)
        finished_in_pool(commit_worker, run.id)
        deadline = time.monotonic() + 10
        killed = 0
        while not killed:  # the committer's statement, waiting on the lock: cut it off
            assert time.monotonic() < deadline, "the committer's statement never showed"
            killed = blocker.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE 'WITH v AS (SELECT r.id%%'"
            ).fetchone()[0]
            time.sleep(0.1)
        time.sleep(0.5)
        assert unacked(commit_worker) == 1
    assert wait_for(run.id, timeout=15).state == "SUCCESS"
    wait_acknowledged(commit_worker)
    assert "retrying until the database is back" in commit_worker.log.read_text()
