"""The worker's hot path: a run's final state in one statement (jobs.worker.backend)."""

import threading
import time
import uuid

import pytest
from celery.app.task import Context
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_celery_results.models import ChordCounter, TaskResult

from jobs.models import Job
from jobsite.celery import app


def request_for(task_id: str, **extra) -> Context:
    fields = {"task": "jobs.noop", "hostname": "w1@host", "args": [], "kwargs": {},
              "delivery_info": {"routing_key": "default"}}  # fmt: skip
    return Context(id=task_id, **{**fields, **extra})


@pytest.fixture
def pending(db, alice) -> Job:
    return Job.objects.create(
        id=str(uuid.uuid4()), task_name="jobs.noop", state="STARTED", submitted_by=alice
    )


def test_a_success_is_one_statement_for_the_job_and_celerys_task_result(pending):
    request = request_for(pending.pk, jobsite_received_at=time.time() - 2)

    with CaptureQueriesContext(connection) as queries:
        app.backend.mark_as_done(pending.pk, {"primes": 7}, request=request)

    assert len(queries) == 1
    job = Job.objects.get(pk=pending.pk)
    assert (job.state, job.result, job.worker) == ("SUCCESS", {"primes": 7}, "w1@host")
    assert job.finished_at and job.received_at and job.received_at < job.finished_at
    stored = TaskResult.objects.get(task_id=pending.pk)
    assert (stored.status, stored.task_name, stored.worker) == ("SUCCESS", "jobs.noop", "w1@host")
    assert app.backend.get_task_meta(pending.pk)["result"] == {"primes": 7}


def test_a_failure_stores_the_exception_on_the_job_and_in_celerys_record(pending):
    app.backend.mark_as_failure(
        pending.pk, ValueError("disk full"), traceback="Traceback: boom",
        request=request_for(pending.pk),
    )  # fmt: skip

    job = Job.objects.get(pk=pending.pk)
    assert (job.state, job.exception_type, job.error_message) == (
        "FAILURE", "ValueError", "disk full",
    )  # fmt: skip
    assert job.traceback == "Traceback: boom"
    assert TaskResult.objects.get(task_id=pending.pk).status == "FAILURE"
    assert isinstance(app.backend.get_task_meta(pending.pk)["result"], ValueError)


def test_a_run_cancelled_meanwhile_stays_cancelled(pending):
    Job.objects.filter(pk=pending.pk).update(state="REVOKED", error_message="Cancelled by alice")

    app.backend.mark_as_done(pending.pk, {"late": True}, request=request_for(pending.pk))

    job = Job.objects.get(pk=pending.pk)
    assert (job.state, job.result, job.error_message) == ("REVOKED", None, "Cancelled by alice")


def test_a_run_jobsite_has_not_seen_gets_its_job_row(db):
    task_id = str(uuid.uuid4())  # e.g. a plain .delay() of a catalogued task

    app.backend.mark_as_done(task_id, {"ok": 1}, request=request_for(task_id, kwargs={"n": 3}))

    job = Job.objects.get(pk=task_id)
    assert (job.state, job.result, job.source, job.params) == (
        "SUCCESS", {"ok": 1}, "external", {"n": 3},
    )  # fmt: skip
    assert TaskResult.objects.get(task_id=task_id).status == "SUCCESS"


@pytest.mark.django_db(transaction=True)
def test_a_chord_part_that_finishes_before_its_counter_is_committed_is_still_counted():
    # The publisher commits the ChordCounter after the header messages are out.
    group_id = str(uuid.uuid4())

    def publisher_commits_later():
        time.sleep(0.3)
        ChordCounter.objects.create(group_id=group_id, sub_tasks="[]", count=2)
        connection.close()

    thread = threading.Thread(target=publisher_commits_later)
    thread.start()
    request = request_for(str(uuid.uuid4()), group=group_id, chord={"task": "jobs.sum_results"})

    app.backend.on_chord_part_return(request, "SUCCESS", {"primes": 1})
    thread.join()

    assert ChordCounter.objects.get(group_id=group_id).count == 1  # counted, not dropped
