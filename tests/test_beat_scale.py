"""JobsiteScheduler's shortcuts for many schedules keep beat's bookkeeping right.

Beat at 10,000 schedules is measured by bench/beat.py; these tests check that the
shortcuts it needs (one batch for the last run times, the change check and the
lock renewed at most once per second, no entry-by-entry comparison) lose nothing.
"""

from __future__ import annotations

import pytest
from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

from jobs.beat import JobsiteScheduler
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


def test_the_change_check_is_throttled_to_once_per_interval(scheduler, every_10s):
    scheduler.schedule  # noqa: B018  (the initial read)
    scheduler.check_every = 3600
    scheduler.schedule_changed()
    schedule("third", every_10s)
    PeriodicTasks.update_changed()

    assert scheduler.schedule_changed() is False
    scheduler.check_every = 0
    assert scheduler.schedule_changed() is True
