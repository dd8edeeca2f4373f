"""The guard judges a run's holder by incarnation, not by name (issue 20).

A supervisor restarts a killed worker under the same name: the new incarnation answers
to that name, but the runs the old one held are orphans. Deterministic: the dead
holder's marker is set by the test, the live worker of that name is the session's.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest
from django.utils import timezone

from jobs import heartbeat, markers, redis
from jobs.api.serializers import RunSerializer
from jobs.models import Job, JobLog
from jobs.tasks.demo import long_sleep, send_mail
from tests.conftest import Worker, wait_for

pytestmark = pytest.mark.broker

MAIL = {"to": "ops@example.com", "body": "hello"}


def dead_pid() -> int:
    """A process id that existed on this machine and is gone (reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def other_worker(worker, _workers):
    """w1: a second worker, alone on its queue (concurrency 1: one process, one buffer)."""
    w1 = Worker(worker.broker, worker.url, _workers.db_url, name=f"test-{worker.broker}-w1",
                queues="incq", concurrency=1)  # fmt: skip
    w1.start()
    yield w1
    w1.stop()


def worker_name(worker: Worker) -> str:
    return f"{worker.name}@{heartbeat.MACHINE}"


def new_run(alice, granted, subject: str, **fields) -> str:
    job_id = str(uuid.uuid4())
    params = {**MAIL, "subject": subject}
    Job.objects.create(id=job_id, task_name="jobs.send_mail", submitted_by=alice,
                       job_type=granted["send_mail"], params=params, **fields)  # fmt: skip
    return job_id


def settled(job_id: str, timeout: float = 30.0) -> Job:
    """Wait until the run finished or its delivery was skipped: one or the other happens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = Job.objects.get(pk=job_id)
        if job.state == "SUCCESS" or job.duplicates_skipped:
            return job
        time.sleep(0.1)
    raise AssertionError(f"run {job_id} neither finished nor was skipped in {timeout}s")


def wait_for_log(job_id: str, text: str, timeout: float = 10.0) -> JobLog:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = JobLog.objects.filter(job_id=job_id, message__contains=text).first()
        if line is not None:
            return line
        time.sleep(0.1)
    raise AssertionError(f"no log line {text!r} on run {job_id} in {timeout}s")


def mail_sent(worker: Worker, subject: str) -> int:
    return "".join(p.read_text() for p in worker.mail_dir.glob("*.log")).count(subject)


@pytest.mark.parametrize("incarnation_key", ["expired", "left by the kill"])
def test_a_run_held_by_a_dead_incarnation_of_a_live_name_runs(
    worker, other_worker, alice, alice_client, granted, incarnation_key
):
    """The issue's lost run: w2 died holding it, a new w2 answers to the name."""
    # As the dead holder left it: started on w2, one execution.
    left = {"state": "STARTED", "worker": worker_name(worker), "started_at": timezone.now()}
    job_id = new_run(alice, granted, subject=f"orphan-{uuid.uuid4()}", executions=1, **left)
    dead = f"dead{uuid.uuid4().hex[:4]}"
    if incarnation_key == "left by the kill":  # SIGKILLed seconds ago, on this machine
        redis.client().set(heartbeat.INCARNATION_KEY.format(dead), heartbeat.MACHINE, ex=30)
    # Held by the session worker's name (alive, answers pings) in a dead incarnation.
    redis.client().set(
        markers.key(job_id), f"run|{worker_name(worker)}|{dead}|{dead_pid()}|tok".encode()
    )

    send_mail.apply_async(kwargs=Job.objects.get(pk=job_id).params, task_id=job_id, queue="incq")
    job = settled(job_id)

    assert job.duplicates_skipped == 0, "skipped: a pong of the name judged the holder alive"
    job = wait_for(job_id)
    assert job.state == "SUCCESS"
    assert job.worker == worker_name(other_worker)
    assert job.executions == 2
    assert mail_sent(other_worker, job.params["subject"]) == 1
    # The run's log lines are stored as it ends, just after its final state.
    died = wait_for_log(job_id, f"incarnation {dead}")
    assert "s after it started" in died.message
    assert job.executions_note.startswith("Executed 2 times")
    page = alice_client.get(job.get_absolute_url()).content.decode()
    assert "Executed 2 times" in page
    assert RunSerializer(job).data["executions"] == 2


def test_a_skipped_duplicate_writes_nothing_but_its_count(worker, other_worker, alice, granted):
    job_id = new_run(alice, granted, subject=f"held-{uuid.uuid4()}")
    alive = f"live{uuid.uuid4().hex[:4]}"
    # A live holder: its incarnation heartbeats, its process (this test) exists.
    redis.client().set(heartbeat.INCARNATION_KEY.format(alive), heartbeat.MACHINE, ex=30)
    redis.client().set(
        markers.key(job_id), f"run|{worker_name(worker)}|{alive}|{os.getpid()}|tok".encode()
    )

    send_mail.apply_async(kwargs=Job.objects.get(pk=job_id).params, task_id=job_id, queue="incq")
    assert settled(job_id).duplicates_skipped == 1
    # The same (only) pool process runs a second job for over a second: whatever the
    # skipped delivery buffered has been written by then.
    follow = str(uuid.uuid4())
    Job.objects.create(id=follow, task_name="jobs.long_sleep", submitted_by=alice,
                       job_type=granted["long_sleep"], params={"seconds": 1})  # fmt: skip
    long_sleep.apply_async(kwargs={"seconds": 1}, task_id=follow, queue="incq")
    wait_for(follow)

    job = Job.objects.get(pk=job_id)
    assert (job.state, job.worker, job.started_at, job.executions) == ("PENDING", "", None, 0)
    assert job.duplicates_skipped == 1
    assert mail_sent(other_worker, job.params["subject"]) == 0


def test_a_run_executed_once_per_attempt_says_nothing(db):
    assert Job(executions=2, retries=1).executions_note == ""
    assert Job(executions=1).executions_note == ""
    assert Job(executions=3, retries=1).executions_note.startswith("Executed 3 times")


def test_liveness_is_the_incarnation_key_and_on_this_machine_the_process(settings):
    r = redis.client()
    here, there, gone = (f"i{uuid.uuid4().hex[:6]}" for _ in range(3))
    r.set(heartbeat.INCARNATION_KEY.format(here), heartbeat.MACHINE, ex=30)
    r.set(heartbeat.INCARNATION_KEY.format(there), "another-machine", ex=30)

    assert heartbeat.holders_alive(
        [(here, os.getpid()), (here, dead_pid()), (there, dead_pid()), (gone, os.getpid())]
    ) == [True, False, True, False]


def test_a_worker_heartbeats_its_incarnation(worker):
    r = redis.client()
    keys = list(r.scan_iter(match=heartbeat.INCARNATION_KEY.format("*")))
    assert keys, "no worker incarnation is known"
    # Other tests' keys may be expiring meanwhile (TTL 0, or gone: -2); none may be
    # without an expiry (-1), and the live worker's is within one TTL.
    ttls = [r.ttl(k) for k in keys]
    assert -1 not in ttls, "an incarnation key never expires"
    assert all(t <= heartbeat.INCARNATION_TTL for t in ttls)
    assert any(t > 0 for t in ttls)
