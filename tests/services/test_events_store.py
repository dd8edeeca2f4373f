"""Runs seen through task events: one statement per batch, never moved backwards.

The events are shaped as Celery 5.7's worker sends them (celery.events.state tests and
celery/worker/request.py name the fields); the store runs on the test PostgreSQL.
"""

from __future__ import annotations

import time
import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs import heartbeat, specs
from jobs.models import Job, JobSource, JobState
from jobs.redis import client
from jobs.services import events as store
from jobs.services.maintenance import jobs_mark_lost, jobs_resend_vanished

pytestmark = pytest.mark.django_db

HOST = "other@host-a"


def ev(kind: str, task_id: str, at: float, **fields) -> dict:
    base = {"type": f"task-{kind}", "uuid": task_id, "timestamp": at, "hostname": HOST}
    return {**base, **fields}


def lifecycle(task_id: str, at: float, *, name="billing.tasks.invoice") -> list[dict]:
    return [
        ev(
            "received",
            task_id,
            at,
            name=name,
            args="(1, 'x')",
            kwargs="{'n': 2}",
            retries=0,
            root_id=task_id,
            parent_id=None,
        ),
        ev("started", task_id, at + 0.1, pid=42),
        ev("succeeded", task_id, at + 0.5, result="'done'", runtime=0.4),
    ]


@pytest.fixture(autouse=True)
def _fresh_worker_cache():
    store._OWN_CACHE.clear()
    yield
    store._OWN_CACHE.clear()
    client().zrem(heartbeat.WORKERS_KEY, "jobsite-worker@host-b")


def test_a_run_of_another_worker_is_stored_with_what_its_events_say():
    task_id, now = str(uuid.uuid4()), time.time() - 5
    assert store.events_store(lifecycle(task_id, now)) == 1
    job = Job.objects.get(pk=task_id)
    assert job.source == JobSource.EVENTS
    assert job.state == JobState.SUCCESS
    assert job.task_name == "billing.tasks.invoice" and job.job_type is None
    assert job.worker == HOST
    assert job.params == {"n": 2, "_args": [1, "x"]}
    assert job.result == "'done'"
    assert job.started_at and job.finished_at and job.received_at
    assert job.runtime.total_seconds() == pytest.approx(0.4, abs=0.01)
    assert job.executions == 1


def test_a_batch_is_one_statement_whatever_its_size():
    now = time.time() - 5
    events = [e for _ in range(200) for e in lifecycle(str(uuid.uuid4()), now)]
    with CaptureQueriesContext(connection) as queries:
        assert store.events_store(events) == 200
    writes = [q["sql"] for q in queries if q["sql"].startswith("INSERT")]
    assert len(writes) == 1, writes
    assert Job.objects.filter(source=JobSource.EVENTS, state=JobState.SUCCESS).count() == 200


def test_events_out_of_order_or_twice_never_move_a_run_back():
    task_id, now = str(uuid.uuid4()), time.time() - 5
    received, started, succeeded = lifecycle(task_id, now)
    store.events_store([succeeded])  # the first one the recorder sees
    job = Job.objects.get(pk=task_id)
    assert job.state == JobState.SUCCESS and job.task_name == ""
    store.events_store([started, received])  # late, in another batch
    job.refresh_from_db()
    assert job.state == JobState.SUCCESS  # a late STARTED never overwrites it
    assert job.task_name == "billing.tasks.invoice"  # but what it adds is kept
    assert job.result == "'done'"
    before = Job.objects.filter(pk=task_id).values().get()
    store.events_store(lifecycle(task_id, now))  # every event again
    assert Job.objects.filter(pk=task_id).values().get() == before


def test_a_newer_event_wins_until_the_run_is_final():
    task_id, now = str(uuid.uuid4()), time.time() - 5
    received, started, _ = lifecycle(task_id, now)
    store.events_store([started])
    store.events_store([received])  # older than the stored STARTED
    assert Job.objects.get(pk=task_id).state == JobState.STARTED


def test_retries_and_failure_with_traceback():
    task_id, now = str(uuid.uuid4()), time.time() - 10
    trace = 'Traceback (most recent call last):\n  File "t.py", line 3\nValueError: no'
    store.events_store([
        ev("received", task_id, now, name="other.flaky", args="()", kwargs="{}", retries=0),
        ev("started", task_id, now + 0.1),
        ev("retried", task_id, now + 0.2, exception="RuntimeError('first')", traceback=trace),
    ])  # fmt: skip
    job = Job.objects.get(pk=task_id)
    assert job.state == JobState.RETRY and job.error_message == "first"
    assert job.exception_type == "RuntimeError"
    store.events_store([
        ev("received", task_id, now + 1, name="other.flaky", args="()", kwargs="{}", retries=1),
        ev("started", task_id, now + 1.1),
        ev("failed", task_id, now + 1.5, exception="ValueError('no')", traceback=trace),
    ])  # fmt: skip
    job.refresh_from_db()
    assert job.state == JobState.FAILURE
    assert job.exception_type == "ValueError" and job.error_message == "no"
    assert "Traceback" in job.traceback
    assert job.retries == 1 and job.executions == 2


def test_a_run_that_succeeds_after_a_retry_has_no_error():
    task_id, now = str(uuid.uuid4()), time.time() - 10
    store.events_store([
        ev("received", task_id, now, name="other.flaky", args="()", kwargs="{}", retries=0),
        ev("retried", task_id, now + 0.2, exception="RuntimeError('first')", traceback="T"),
    ])  # fmt: skip
    store.events_store([
        ev("received", task_id, now + 1, name="other.flaky", args="()", kwargs="{}", retries=1),
        ev("succeeded", task_id, now + 1.5, result="'ok'"),
    ])  # fmt: skip
    job = Job.objects.get(pk=task_id)
    assert job.state == JobState.SUCCESS and job.retries == 1
    assert (job.exception_type, job.error_message, job.traceback) == ("", "", "")
    assert job.sent_at is None  # no task-sent event: when it was sent is not known
    # The worker's task-retried event may come after the retry already succeeded.
    store.events_store([ev("retried", task_id, now + 2, exception="RuntimeError('x')")])
    job.refresh_from_db()
    assert job.state == JobState.SUCCESS and job.error_message == ""


def test_revoked_and_rejected():
    revoked, rejected, requeued = (str(uuid.uuid4()) for _ in range(3))
    now = time.time() - 5
    store.events_store([
        ev("revoked", revoked, now, terminated=False, signum=None, expired=False),
        ev("rejected", rejected, now, requeue=False),
        ev("rejected", requeued, now, requeue=True),
    ])  # fmt: skip
    assert Job.objects.get(pk=revoked).state == JobState.REVOKED
    assert Job.objects.get(pk=rejected).state == JobState.FAILURE
    assert not Job.objects.filter(pk=requeued).exists()  # back in its queue


def test_a_run_jobsite_records_itself_is_never_touched(job_types, alice):
    job = Job.objects.create(id=str(uuid.uuid4()), task_name="jobs.send_mail",
                             job_type=job_types["send_mail"], submitted_by=alice,
                             state=JobState.STARTED, source=JobSource.FORM)  # fmt: skip
    before = Job.objects.filter(pk=job.pk).values().get()
    store.events_store(lifecycle(job.pk, time.time() - 5, name="jobs.send_mail"))
    assert Job.objects.filter(pk=job.pk).values().get() == before


def test_events_of_jobsite_s_own_workers_are_not_stored():
    client().zadd(heartbeat.WORKERS_KEY, {"jobsite-worker@host-b": time.time()})
    task_id = str(uuid.uuid4())
    events = [{**e, "hostname": "jobsite-worker@host-b"} for e in lifecycle(task_id, time.time())]
    assert store.events_store(events) == 0
    assert not Job.objects.filter(pk=task_id).exists()


def test_secret_parameters_are_masked_and_not_searchable(job_types):
    spec = next(s for s in specs.all_specs() if s.secret_fields)
    secret_field = spec.secret_fields[0]
    catalogued, foreign = str(uuid.uuid4()), str(uuid.uuid4())
    now = time.time() - 5
    store.events_store([
        ev("received", catalogued, now, name=spec.task_name, args="()",
           kwargs=repr({secret_field: "hunter2-catalogued", "other": 1})),
        ev("received", foreign, now, name="other.login", args="()",
           kwargs=repr({"password": "hunter2-foreign", "api_key": "k-123", "user": "bo"})),
        ev("received", str(uuid.uuid4()), now, name=spec.task_name, args="(<object at 0x1>,)",
           kwargs="{'x': <object at 0x2>}"),
    ])  # fmt: skip
    job = Job.objects.get(pk=catalogued)
    assert job.params[secret_field] == specs.MASK and job.params["other"] == 1
    assert job.job_type is not None and job.job_type.name == spec.name
    assert Job.objects.get(pk=foreign).params == {
        "password": specs.MASK, "api_key": specs.MASK, "user": "bo"}  # fmt: skip
    for text in ("hunter2", "k-123", "object at"):
        assert not Job.objects.filter(params__icontains=text).exists(), text


def test_bad_events_change_nothing():
    before = Job.objects.count()
    assert store.events_store([
        {"type": "task-succeeded"},  # no id
        {"type": "task-succeeded", "uuid": 123},
        {"type": "task-succeeded", "uuid": "x" * 300},
        {"type": "task-unknown", "uuid": str(uuid.uuid4())},
        {"type": "worker-heartbeat", "hostname": HOST, "timestamp": time.time()},
        {"type": "task-received", "uuid": str(uuid.uuid4()), "timestamp": "not a time",
         "name": "x", "args": "(" * 5000, "kwargs": "{", "eta": "no date"},
    ]) == 1  # fmt: skip
    assert Job.objects.count() == before + 1
    odd = Job.objects.filter(source=JobSource.EVENTS).latest("created_at")
    assert odd.params == {"_kwargs": "{", "_args": "(" * 5000} and odd.eta is None


def test_jobsite_s_reconciliation_leaves_runs_seen_through_events_alone():
    started, sent = str(uuid.uuid4()), str(uuid.uuid4())
    long_ago = time.time() - 3600
    store.events_store([
        ev("received", started, long_ago, name="other.t", args="()", kwargs="{}"),
        ev("started", started, long_ago + 1),
        {"type": "task-sent", "uuid": sent, "timestamp": long_ago, "name": "other.t",
         "args": "()", "kwargs": "{}", "queue": "celery"},
    ])  # fmt: skip
    jobs_mark_lost(lost_after=60)
    jobs_resend_vanished(after=1)
    assert Job.objects.get(pk=started).state == JobState.STARTED
    assert Job.objects.get(pk=sent).state == JobState.PENDING


def test_a_foreign_worker_gone_silent_has_its_runs_marked_lost():
    task_id, then = str(uuid.uuid4()), time.time() - 900
    store.events_store([
        ev("received", task_id, then, name="other.t", args="()", kwargs="{}"),
        ev("started", task_id, then + 1),
    ])  # fmt: skip
    seen = {HOST: then + 1, "alive@host": time.time()}
    assert store.events_mark_silent_workers_lost(seen, lost_after=300) == 1
    job = Job.objects.get(pk=task_id)
    assert job.state == JobState.LOST and "no event" in job.error_message
    assert seen == {"alive@host": seen["alive@host"]}
    store.events_store([ev("succeeded", task_id, time.time(), result="1")])  # it ran after all
    assert Job.objects.get(pk=task_id).state == JobState.SUCCESS


def test_a_run_seen_through_events_is_not_sent_again(job_types, admin_user):
    from jobs.selectors.runs import job_actions
    from jobs.services import ActionError, job_rerun, job_retry

    task_id, now = str(uuid.uuid4()), time.time() - 5
    store.events_store([
        ev("received", task_id, now, name="jobs.noop", args="()", kwargs="{}"),
        ev("failed", task_id, now + 1, exception="ValueError('x')", traceback="T"),
    ])  # fmt: skip
    job = Job.objects.get(pk=task_id)
    assert job.job_type is not None and job.state == JobState.FAILURE
    assert job_actions(user=admin_user, job=job) == {"delete"}
    with pytest.raises(ActionError, match="seen through another worker's events"):
        job_retry(job=job, user=admin_user)
    with pytest.raises(ActionError, match="seen through another worker's events"):
        job_rerun(job=job, user=admin_user, params={})
    assert Job.objects.count() == 1
