"""JobsiteScheduler's shortcuts for many schedules keep beat's bookkeeping right.

Beat at 10,000 schedules is measured by bench/beat.py; these tests check that the
shortcuts it needs (one batch for the last run times, the change check and the
lock renewed at most once per second, no entry-by-entry comparison) lose nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import time
import uuid
from collections.abc import Iterator

import pytest
from django.utils import timezone
from django_celery_beat.models import (
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    PeriodicTasks,
    SolarSchedule,
)

from jobs.beat import JobsiteScheduler
from jobs.worker import guard
from jobsite.celery import app as celery_app


@pytest.fixture
def every_10s(transactional_db):
    return IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)


def schedule(name: str, interval) -> PeriodicTask:
    return PeriodicTask.objects.create(name=name, task="jobs.noop", interval=interval)


@pytest.fixture
def scheduler(every_10s, job_types):
    schedule("first", every_10s)
    schedule("second", every_10s)
    sched = JobsiteScheduler(app=celery_app, lazy=True)
    yield sched
    sched._lock.local.token = None  # never acquired: nothing to release
    # Celery syncs a scheduler's unsaved entries at interpreter exit, by when the test
    # database is gone: nothing is left to sync.
    sched._dirty.clear()


def test_sync_stores_the_last_run_time_and_count_of_every_sent_entry(scheduler):
    for name in ("first", "second", "first"):
        scheduler.reserve(scheduler.schedule[name])

    scheduler.sync()

    rows = {t.name: t for t in PeriodicTask.objects.filter(name__in=["first", "second"])}
    assert rows["first"].total_run_count == 2
    assert rows["second"].total_run_count == 1
    assert rows["first"].last_run_at is not None
    assert scheduler._dirty == set()


def test_sync_of_a_schedule_deleted_meanwhile_changes_nothing_else(scheduler):
    scheduler.reserve(scheduler.schedule["first"])
    scheduler.reserve(scheduler.schedule["second"])
    PeriodicTask.objects.filter(name="first").delete()

    scheduler.sync()

    assert PeriodicTask.objects.get(name="second").total_run_count == 1
    assert not PeriodicTask.objects.filter(name="first").exists()


def test_a_schedule_added_to_the_table_reaches_the_running_scheduler(scheduler, every_10s):
    assert set(scheduler.schedule) >= {"first", "second"}
    scheduler.check_every = 0  # the next tick is more than a second later
    scheduler.schedule_changed()  # beat's first tick notes the table's last change
    schedule("third", every_10s)
    PeriodicTasks.update_changed()

    assert "third" in scheduler.schedule
    assert scheduler.schedules_equal(None, scheduler.schedule) is False
    assert scheduler.schedules_equal(None, scheduler.schedule) is True


def test_start_up_does_not_take_its_own_default_entries_for_a_change(scheduler, every_10s):
    # The initial read, then Celery's and CELERY_BEAT_SCHEDULE's entries are saved,
    # which marks the table changed: that must not cost a second read of every schedule.
    scheduler.setup_schedule()
    assert {"first", "second", "jobsite-relay"} <= set(scheduler.schedule)
    scheduler.check_every = 0  # the first tick, more than a second later

    assert scheduler.schedule_changed() is False
    schedule("third", every_10s)  # a change made after start-up still is one
    PeriodicTasks.update_changed()
    assert scheduler.schedule_changed() is True


def test_the_change_check_is_throttled_to_once_per_interval(scheduler, every_10s):
    scheduler.schedule  # noqa: B018  (the initial read)
    scheduler.check_every = 3600
    scheduler.schedule_changed()
    schedule("third", every_10s)
    PeriodicTasks.update_changed()

    assert scheduler.schedule_changed() is False
    scheduler.check_every = 0
    assert scheduler.schedule_changed() is True


# --- Runs sent ahead of their due time (JOBSITE_BEAT_LEAD) ------------------------------


@pytest.fixture
def queue_name(live_broker) -> Iterator[str]:
    live_broker("redis")  # beat publishes to the app's broker, Redis unless a test moved it
    name = f"test-ahead-{uuid.uuid4().hex[:8]}"
    yield name
    with celery_app.connection_for_write() as conn:
        conn.default_channel.queue_delete(name)


def sent_message(queue: str):
    """The one message beat published to ``queue`` (its headers), read off the broker."""
    # The app's connection: its transport options say where priorities put the message.
    with celery_app.connection_for_read() as conn, conn.SimpleQueue(queue) as simple:
        message = simple.get(timeout=5)
        message.ack()
        with pytest.raises(simple.Empty):
            simple.get(timeout=0.2)
        return message.headers


def load(scheduler: JobsiteScheduler, lead: int) -> None:
    """Read the schedules as beat does at start-up (no later re-read by the test)."""
    scheduler.lead = lead
    scheduler._schedule = scheduler.all_as_schedule()
    scheduler._initial_read = False
    scheduler._last_full_sync = datetime.datetime.now()  # naive, as DatabaseScheduler keeps it
    scheduler.check_every = 3600
    scheduler._changes_checked_at = time.monotonic()


def fire(scheduler: JobsiteScheduler, entry):
    """What Celery's tick does with the entry at the top of its heap, if it is due.

    Returns is_due's answer and the entry that goes back on the heap.
    """
    state = scheduler.is_due(entry)
    if state.is_due:
        next_entry = scheduler.reserve(entry)
        scheduler.apply_entry(entry, producer=scheduler.producer)
        return state, next_entry
    return state, entry


def aware(value) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value) if isinstance(value, str) else value


@pytest.mark.broker
def test_a_run_due_within_the_lead_is_sent_ahead_with_its_due_time_as_eta(
    scheduler, every_10s, queue_name
):
    due = timezone.now() + datetime.timedelta(seconds=4)
    task = PeriodicTask.objects.create(
        name="ahead", task="jobs.noop", interval=every_10s, queue=queue_name,
        last_run_at=due - datetime.timedelta(seconds=10), expire_seconds=30,
    )  # fmt: skip
    load(scheduler, lead=10)

    state, entry = fire(scheduler, scheduler.schedule["ahead"])

    assert state.is_due
    headers = sent_message(queue_name)
    assert aware(headers["eta"]) == due  # to the microsecond
    assert aware(headers["expires"]) == due + datetime.timedelta(seconds=30)
    assert (
        entry.last_run_at == entry.model.last_run_at == due
    )  # the run sent is the one due then, not "now"
    # Until that run is due, the next one is not sent ahead: look again just after it.
    again = scheduler.is_due(entry)
    until_due = (due - timezone.now()).total_seconds()
    assert not again.is_due and abs(again.next - (until_due + 0.02)) < 0.1
    scheduler.sync()
    task.refresh_from_db()
    assert task.last_run_at == due and task.total_run_count == 1


@pytest.mark.broker
@pytest.mark.parametrize("change", ["none", "disabled", "deleted", "edited", "new interval"])
def test_a_run_sent_ahead_is_cancelled_when_its_schedule_changes_before_it_is_due(
    scheduler, every_10s, queue_name, change
):
    task = PeriodicTask.objects.create(
        name="ahead", task="jobs.noop", interval=every_10s, queue=queue_name,
        last_run_at=timezone.now() - datetime.timedelta(seconds=5),
    )  # fmt: skip
    load(scheduler, lead=10)
    assert fire(scheduler, scheduler.schedule["ahead"])[0].is_due
    task_id = sent_message(queue_name)["id"]
    scheduler.sync()  # as beat does before it re-reads the schedules

    if change == "disabled":  # as the admin's "disable" action does
        PeriodicTask.objects.filter(pk=task.pk).update(enabled=False)
    elif change == "deleted":
        task.delete()
    elif change == "edited":  # saved from the admin form
        task.refresh_from_db()
        task.kwargs = '{"note": "changed"}'
        task.save()
    elif change == "new interval":
        IntervalSchedule.objects.filter(pk=every_10s.pk).update(every=20)
    scheduler.all_as_schedule()  # beat's re-read after the change

    assert guard.is_revoked(task_id) is (change != "none")


@pytest.mark.broker
def test_the_crontab_run_after_one_sent_ahead_is_the_next_minute(scheduler, queue_name):
    every_minute = CrontabSchedule.objects.create(minute="*", hour="*", timezone="UTC")
    now = timezone.now()
    if now.second >= 55:  # keep the coming minute well ahead of the assertions below
        time.sleep(60.5 - now.second - now.microsecond / 1e6)
        now = timezone.now()
    # Ran at the start of this minute (not "5 s ago": in a minute's first 5 s that was
    # the previous minute, whose next run is due already, so it is not sent ahead).
    PeriodicTask.objects.create(
        name="cron", task="jobs.noop", crontab=every_minute, queue=queue_name,
        last_run_at=now.replace(second=0, microsecond=0),
    )  # fmt: skip
    load(scheduler, lead=120)  # a run due every minute is always within it

    state, entry = fire(scheduler, scheduler.schedule["cron"])

    assert state.is_due
    eta = aware(sent_message(queue_name)["eta"])
    assert eta > timezone.now() and eta.second == eta.microsecond == 0
    assert entry.last_run_at == eta
    # Once that minute has come, the run sent ahead is the following minute's.
    with freeze(entry, eta - datetime.timedelta(seconds=1)):
        assert not scheduler.is_due(entry).is_due  # one run ahead at a time
    with freeze(entry, eta + datetime.timedelta(seconds=1)):
        state, entry = fire(scheduler, entry)
    assert state.is_due
    assert aware(sent_message(queue_name)["eta"]) == eta + datetime.timedelta(minutes=1)


@pytest.mark.broker
@pytest.mark.parametrize(
    "fields",
    [
        {"one_off": True},
        {"start_time_in": 3},  # starts later: its first run is sent when due
        {"expires_in": 2},  # the schedule ends before its next run
        {"enabled": False},
        {"solar": True},
    ],
    ids=["one-off", "not started", "ends first", "disabled", "solar"],
)
def test_a_run_that_must_not_go_early_is_not_sent_ahead(scheduler, every_10s, queue_name, fields):
    now = timezone.now()
    extra = dict(fields)
    if start_in := extra.pop("start_time_in", None):
        extra["start_time"] = now + datetime.timedelta(seconds=start_in)
    if expires_in := extra.pop("expires_in", None):
        extra["expires"] = now + datetime.timedelta(seconds=expires_in)
    if extra.pop("solar", False):  # at sunset: a schedule with no fixed period
        extra["solar"] = SolarSchedule.objects.create(
            event="sunset", latitude=52.52, longitude=13.40
        )
    else:
        extra["interval"] = every_10s
    PeriodicTask.objects.create(
        name="not ahead", task="jobs.noop", queue=queue_name,
        last_run_at=now - datetime.timedelta(seconds=6), **extra,
    )  # fmt: skip
    load(scheduler, lead=10)
    entry = scheduler.schedule.get("not ahead")
    if entry is None:  # a disabled schedule is not even read
        assert fields == {"enabled": False}
        return

    state, _ = fire(scheduler, entry)

    assert not state.is_due and not scheduler._due_ahead
    if "solar" in fields:  # the next sunset is hours away: ask the rule itself
        assert scheduler._ahead_wait(entry) is None


@pytest.mark.broker
@pytest.mark.parametrize("lead", [0, 5])  # the next run, 10 s on, is beyond both
def test_a_run_sent_is_not_due_again_when_the_heap_is_rebuilt(
    scheduler, every_10s, queue_name, lead
):
    PeriodicTask.objects.create(
        name="once", task="jobs.noop", interval=every_10s, queue=queue_name,
        last_run_at=timezone.now() - datetime.timedelta(seconds=11),
    )  # fmt: skip
    load(scheduler, lead=lead)
    assert fire(scheduler, scheduler.schedule["once"])[0].is_due
    sent_message(queue_name)

    # The tick after a reload rebuilds the heap from the schedule it holds, unread.
    scheduler.populate_heap()

    assert not scheduler.is_due(scheduler.schedule["once"]).is_due
    assert not any(event.entry.name == "once" and event.time <= time.time()
                   for event in scheduler._heap)  # fmt: skip


@pytest.mark.broker
def test_with_no_lead_a_run_is_sent_when_it_is_due_only(scheduler, every_10s, queue_name):
    PeriodicTask.objects.create(
        name="on time", task="jobs.noop", interval=every_10s, queue=queue_name,
        last_run_at=timezone.now() - datetime.timedelta(seconds=8),
    )  # fmt: skip
    load(scheduler, lead=0)

    state, _ = fire(scheduler, scheduler.schedule["on time"])

    assert not state.is_due and 1 < state.next <= 2


@contextlib.contextmanager
def freeze(entry, moment: datetime.datetime):
    """Let the entry's schedule (and the entry) see ``moment`` as now."""
    schedule, nowfun = entry.schedule, entry.schedule.nowfun
    schedule.nowfun = lambda: moment
    entry.default_now = lambda: moment
    try:
        yield
    finally:
        schedule.nowfun = nowfun
        del entry.default_now
