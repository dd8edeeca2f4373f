"""The duplicate-delivery guard: a Redis marker per run (SET NX + owner-only release)."""

import time
import uuid

import pytest

from jobs import guard
from jobs.models import Job, JobLog
from jobs.tasks import generate_report

from .conftest import Worker, wait_for

REPORT = {"title": "Dup", "region": "emea", "days": 10, "rows_per_day": 5, "pace_ms": 100}


@pytest.fixture
def second_worker(worker, _workers):
    extra = Worker(worker.broker, worker.url, _workers.db_url, name=f"test-{worker.broker}-2")
    extra.start()
    yield extra
    extra.stop()


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_the_same_run_published_twice_to_two_workers_executes_once(
    worker, second_worker, alice, granted
):
    job_id = str(uuid.uuid4())
    Job.objects.create(id=job_id, task_name="jobs.generate_report", submitted_by=alice,
                       job_type=granted["generate_report"], params=REPORT)  # fmt: skip

    generate_report.apply_async(kwargs=REPORT, task_id=job_id)
    generate_report.apply_async(kwargs=REPORT, task_id=job_id)
    job = wait_for(job_id)
    assert wait_until(lambda: Job.objects.get(pk=job_id).duplicates_skipped == 1)
    generate_report.apply_async(kwargs=REPORT, task_id=job_id)  # late: after it finished
    assert wait_until(lambda: Job.objects.get(pk=job_id).duplicates_skipped == 2)

    started = JobLog.objects.filter(job_id=job_id, message__startswith="Writing Dup report")
    skipped = JobLog.objects.filter(job_id=job_id, message__startswith="Duplicate delivery")
    assert job.state == "SUCCESS"
    assert started.count() == 1
    assert skipped.count() == 2
    assert {"running on", "already finished"} <= {
        "running on" if "running on" in m else "already finished"
        for m in skipped.values_list("message", flat=True)
    }


def test_only_the_owner_can_release_or_finish_a_marker(settings):
    task_id = f"unit-{uuid.uuid4()}"
    mine = guard.claim(task_id, "w1@host")
    other = guard.claim(task_id, "w2@host")

    guard.release(task_id, b"run|w2@host|abcd|1|forged")
    still = guard.claim(task_id, "w3@host")
    guard.finish(task_id, mine.value)

    assert mine.outcome == "claimed"
    assert other.outcome == "busy" and other.holder[0] == "w1@host"
    assert still.outcome == "busy"
    assert guard.claim(task_id, "w4@host").outcome == "done"


def test_a_marker_left_by_a_dead_process_can_be_taken_over_once():
    task_id = f"unit-{uuid.uuid4()}"
    dead = b"run|w1@host|0000|999999|abc"
    guard.client().set(f"jobsite:run:{task_id}", dead)

    first = guard.take_over(task_id, dead, "w1@host")
    second = guard.take_over(task_id, dead, "w1@host")

    assert first is not None and first.outcome == "claimed"
    assert second is None  # the marker changed: only one process wins


def test_a_revoked_marker_wins_over_a_claim():
    task_id = f"unit-{uuid.uuid4()}"
    guard.mark_revoked(task_id)

    assert guard.claim(task_id, "w1@host").outcome == "revoked"
