"""django-celery-beat 2.9.0 internals that jobs.beat.scheduler.JobsiteScheduler reads,
writes or replaces (DatabaseScheduler's private attributes, ModelEntry, the admin)."""

from __future__ import annotations

import datetime
from types import SimpleNamespace

import pytest
from django.contrib import admin
from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks, cronexp
from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry
from redis.lock import Lock

from jobs.admin.schedules import ScheduleAdmin
from jobs.beat.scheduler import JobsiteScheduler

# Names JobsiteScheduler adds to DatabaseScheduler: upstream must not use them itself.
JOBSITE_NAMES = {
    "_lock", "_role", "_held_at", "_changes_checked_at", "_due_ahead", "_sent_ahead",
    "lead", "lock_ttl", "check_every", "renew_every", "_become_active", "_become_standby",
    "_hold_lock", "_ahead_wait", "_cancel_outdated_runs",
}  # fmt: skip


@pytest.fixture
def scheduler(app):
    # lazy: no schedule is read, so no database is touched.
    made = DatabaseScheduler(app=app, lazy=True)
    yield made
    made._finalize.cancel()  # its exit-time sync


def entry_for(app, name: str = "every-minute") -> ModelEntry:
    """A ModelEntry on an unsaved PeriodicTask: ModelEntry needs no database for this."""
    model = PeriodicTask(
        name=name,
        task="contracts.add",
        interval=IntervalSchedule(every=1, period=IntervalSchedule.MINUTES),
        last_run_at=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
        total_run_count=4,
    )
    return ModelEntry(model, app=app)


def test_database_schedulers_private_attributes_exist_with_their_types(scheduler):
    assert isinstance(scheduler._dirty, set)
    assert scheduler._schedule is None  # set by the schedule property (dict name -> ModelEntry)
    assert scheduler._last_timestamp is None  # set by setup_schedule / schedule_changed
    assert scheduler._initial_read is True
    assert scheduler._heap_invalidated is False
    assert scheduler.Changes is PeriodicTasks
    assert callable(PeriodicTasks.last_change)
    assert DatabaseScheduler.Entry is ModelEntry


def test_jobsites_own_names_do_not_collide_with_upstreams(app, scheduler):
    upstream = set(dir(DatabaseScheduler)) | set(vars(scheduler))
    ours = JobsiteScheduler(app=app, lazy=True)  # its lock is made, not taken: no Redis
    ours._finalize.cancel()

    assert JOBSITE_NAMES & upstream == set()
    assert set(dir(ours)) >= JOBSITE_NAMES  # the list above is current
    # Set before DatabaseScheduler.__init__ runs, and not overwritten by it.
    assert isinstance(ours._lock, Lock) and ours._due_ahead == {} and ours._sent_ahead == {}


def test_a_reload_of_the_schedule_flags_the_heap_invalid(scheduler):
    """JobsiteScheduler.schedules_equal trusts _heap_invalidated alone."""
    scheduler._initial_read = False
    scheduler._last_full_sync = datetime.datetime.now()
    scheduler.schedule_changed = lambda: True
    scheduler.all_as_schedule = lambda: {"e": "entry"}
    scheduler._heap = ["stale"]

    assert scheduler.schedule == {"e": "entry"}
    assert scheduler._heap == [] and scheduler._heap_invalidated is True
    assert scheduler.schedules_equal({}, {}) is False
    assert scheduler._heap_invalidated is False  # read once


def test_schedule_changed_compares_last_change_with__last_timestamp(scheduler):
    before = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    after = before + datetime.timedelta(seconds=1)
    scheduler.Changes = SimpleNamespace(last_change=lambda: after)

    scheduler._last_timestamp = after  # what JobsiteScheduler.setup_schedule notes as seen
    assert scheduler.schedule_changed() is False
    scheduler._last_timestamp = before
    assert scheduler.schedule_changed() is True
    assert scheduler._last_timestamp == after


def test_reserve_marks_the_entry_dirty_but_leaves_the_schedules_entry_stale(app, scheduler):
    """Why JobsiteScheduler.reserve writes the new entry back into _schedule.

    If this fails, django-celery-beat keeps _schedule current itself: that part is droppable.
    """
    entry = entry_for(app)
    scheduler._schedule = {entry.name: entry}

    new_entry = scheduler.reserve(entry)

    assert scheduler._dirty == {entry.name}
    assert new_entry is not entry and new_entry.model is entry.model
    assert scheduler._schedule[entry.name] is entry  # still the old one
    assert new_entry.model.total_run_count == 5
    assert new_entry.model.no_changes is True


def test_a_model_entry_saves_only_the_fields_jobsites_batched_sync_writes():
    # JobsiteScheduler.sync writes last_run_at and total_run_count in one statement;
    # no_changes is not a column but the flag that keeps the save from signalling a change.
    assert set(ModelEntry.save_fields) == {"last_run_at", "total_run_count", "no_changes"}
    columns = {field.name for field in PeriodicTask._meta.concrete_fields}
    assert {"last_run_at", "total_run_count"} <= columns
    assert "no_changes" not in columns


def test_a_model_entry_has_what_sending_ahead_reads(app):
    entry = entry_for(app)

    assert isinstance(entry.default_now(), datetime.datetime)
    assert entry.last_run_at == entry.model.last_run_at
    assert entry.schedule.run_every == datetime.timedelta(minutes=1)
    for name in ("enabled", "one_off", "clocked_id", "solar_id", "start_time", "expires",
                 "date_changed", "last_run_at", "total_run_count"):  # fmt: skip
        assert hasattr(entry.model, name), name


def test_the_schedule_admin_replaces_django_celery_beats():
    assert isinstance(admin.site.get_model_admin(PeriodicTask), ScheduleAdmin)


def test_cronexp_writes_a_crontab_field_as_cron_does():
    # jobs.selectors.schedules builds the expression it puts into words with it.
    assert cronexp("1, 2") == "1,2"
    assert cronexp("") == "*"
    assert cronexp(None) == "*"
