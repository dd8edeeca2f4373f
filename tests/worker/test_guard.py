"""The duplicate-delivery guard: a Redis marker per run (SET NX + owner-only release)."""

import os
import time
import uuid

import pytest

from jobs import markers, redis
from jobs.models import Job, JobLog
from jobs.tasks.demo import generate_report
from jobs.worker import guard
from tests.conftest import Worker, wait_for

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


@pytest.mark.broker
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
    redis.client().set(f"jobsite:run:{task_id}", dead)

    first = guard.take_over(task_id, dead, "w1@host")
    second = guard.take_over(task_id, dead, "w1@host")

    assert first is not None and first.outcome == "claimed"
    assert second is None  # the marker changed: only one process wins


def test_a_revoked_marker_wins_over_a_claim():
    task_id = f"unit-{uuid.uuid4()}"
    markers.mark_revoked(task_id)

    assert guard.claim(task_id, "w1@host").outcome == "revoked"


# --- Cancelled runs: each process's copy, kept current by Pub/Sub ----------------


@pytest.fixture
def indexed():
    """Cancel markers from before the index are indexed (a worker's start does it)."""
    guard.index_legacy_markers()


@pytest.fixture
def no_marker_reads(indexed, monkeypatch):
    """Fail the test if a check asks Redis for the run's marker (a round trip per run)."""

    def refuse(task_id):
        raise AssertionError(f"asked Redis for the marker of {task_id}")

    monkeypatch.setattr(guard, "is_revoked_marker", refuse)


def test_a_cancel_reaches_a_subscribed_process_without_a_round_trip_per_run(no_marker_reads):
    runs = guard.RevokedRuns()
    before, later, never = (f"unit-{uuid.uuid4()}" for _ in range(3))
    markers.mark_revoked(before)

    assert runs.contains(before)  # loaded from the index when it subscribed
    assert not runs.contains(later)
    markers.mark_revoked(later)
    assert runs.contains(later)  # published: no reload, no marker read
    assert not runs.contains(never)


def test_a_dropped_subscription_asks_the_marker_then_subscribes_again(indexed, caplog):
    runs = guard.RevokedRuns()
    assert not runs.contains(f"unit-{uuid.uuid4()}")  # subscribed
    r = redis.client()
    # Only this copy's subscription: other processes on this Redis keep theirs.
    host, port = runs._pubsub.connection._sock.getsockname()[:2]
    assert r.client_kill_filter(addr=f"{host}:{port}") == 1
    meanwhile = f"unit-{uuid.uuid4()}"
    markers.mark_revoked(meanwhile)  # published while it had no subscription

    assert runs.contains(meanwhile)  # from the marker
    assert "no subscription" in caplog.text
    assert runs.contains(meanwhile)  # from the marker again: no resubscribe at once
    assert runs._pubsub is None
    runs._retry_at -= guard.RESUBSCRIBE_AFTER  # a while later
    assert runs.contains(meanwhile)  # subscribed and loaded again
    assert runs._pubsub is not None


def test_a_time_limit_in_the_middle_of_a_check_drops_the_copy(indexed, monkeypatch):
    from celery.exceptions import SoftTimeLimitExceeded

    runs = guard.RevokedRuns()
    runs.contains("warm-up")

    def interrupted(**kwargs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(runs._pubsub, "get_message", interrupted)
    with pytest.raises(SoftTimeLimitExceeded):
        runs.contains("x")
    assert runs._pubsub is None  # a message may have been half taken in: not trusted


def test_a_silent_subscription_is_proven_alive_by_a_ping(monkeypatch):
    runs = guard.RevokedRuns()
    runs.contains("warm-up")
    pings = []
    original = runs._pubsub.ping
    monkeypatch.setattr(runs._pubsub, "ping", lambda: pings.append(1) or original())

    runs.contains("x")
    assert pings == []  # confirmed less than CONFIRM_EVERY ago
    runs._confirmed -= guard.CONFIRM_EVERY + 0.1
    runs.contains("x")
    assert pings == [1]


def test_an_expired_cancel_no_longer_counts_and_leaves_the_index(indexed):
    r = redis.client()
    old = f"unit-{uuid.uuid4()}"
    r.zadd(markers.REVOKED_INDEX, {old: markers.now_ms() - 1})  # its marker expired

    assert not guard.RevokedRuns().contains(old)
    markers.mark_revoked(f"unit-{uuid.uuid4()}")
    assert r.zscore(markers.REVOKED_INDEX, old) is None


def test_a_long_lived_process_forgets_cancels_whose_markers_expired():
    runs = guard.RevokedRuns()
    runs.contains("warm-up")
    runs._until["gone"] = markers.now_ms() - 1  # its marker expired
    runs._until["kept"] = markers.now_ms() + 60_000

    runs._confirmed -= guard.CONFIRM_EVERY + 0.1  # due for its PING
    runs.contains("x")
    assert "gone" in runs._until  # pruned at most once per PRUNE_EVERY
    runs._pruned -= guard.PRUNE_EVERY + 1
    runs._confirmed -= guard.CONFIRM_EVERY + 0.1
    runs.contains("x")
    assert "gone" not in runs._until
    assert "kept" in runs._until


def test_a_forked_process_subscribes_on_its_own():
    import multiprocessing

    runs = guard.RevokedRuns()
    runs.contains("warm-up")  # the parent's subscription
    cancelled = f"unit-{uuid.uuid4()}"

    def child(conn):
        markers.mark_revoked(cancelled)
        conn.send((runs.contains(cancelled), runs._pid == os.getpid()))

    parent_end, child_end = multiprocessing.get_context("fork").Pipe()
    process = multiprocessing.get_context("fork").Process(target=child, args=(child_end,))
    process.start()
    process.join(20)
    assert parent_end.recv() == (True, True)
    assert runs.contains(cancelled)  # the parent's own subscription still works
    assert runs._pid == os.getpid()


def test_cancel_markers_from_before_the_index_are_indexed_once(monkeypatch):
    r = redis.client()
    legacy = f"unit-{uuid.uuid4()}"
    r.set(f"jobsite:run:{legacy}", markers.REVOKED, px=60_000)  # as the previous version did
    r.delete(guard.LEGACY_INDEXED)
    runs = guard.RevokedRuns()
    assert runs.contains(legacy)  # not indexed yet: the copy is not trusted, the marker is
    assert not runs._trusted

    assert guard.index_legacy_markers() >= 1
    monkeypatch.setattr(guard, "is_revoked_marker", lambda task_id: pytest.fail("marker read"))
    assert guard.RevokedRuns().contains(legacy)  # from the index
    assert 0 < r.zscore(markers.REVOKED_INDEX, legacy) - markers.now_ms() <= 60_000
    assert guard.index_legacy_markers() == 0  # once per Redis


def test_a_claim_whose_reply_was_lost_is_tried_again_and_taken(monkeypatch):
    """Redis away for a moment (a network cut): the claim reached Redis, its reply did
    not. Tried again, the process finds its own marker and takes it, instead of failing
    the run while the redelivered copy elsewhere skips it as a duplicate."""
    import redis as redis_py

    from jobs.worker import task as task_module

    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    task_id = str(uuid.uuid4())
    real_claim, calls = guard.claim, []

    def claim_then_lose_the_reply(run_id, hostname):
        calls.append(run_id)
        if len(calls) == 1:
            real_claim(run_id, hostname)  # the SET happened
            raise redis_py.TimeoutError("Timeout reading from socket")
        return real_claim(run_id, hostname)

    job_task = generate_report._get_current_object()
    claim = job_task._guard(claim_then_lose_the_reply, task_id, "w2@host")
    assert claim.outcome == "busy" and claim.holder[1:] == (guard.INSTANCE, os.getpid())
    assert not job_task._holder_alive(claim, "w2@host")  # our own marker: take it over
    taken = guard.take_over(task_id, claim.value, "w2@host")
    assert taken is not None and taken.outcome == "claimed"

    monkeypatch.setattr(task_module, "GUARD_RIDE_OUT", 0.0)
    with pytest.raises(redis_py.ConnectionError):  # away for longer: the run fails, said so
        job_task._guard(lambda: (_ for _ in ()).throw(redis_py.ConnectionError("down")))
