"""A schedule's next run times and DST notes (jobs.selectors.schedules)."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django_celery_beat.models import (
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    SolarSchedule,
)

from jobs.selectors import schedules
from tests.admin.test_schedules import make_schedule

BERLIN = ZoneInfo("Europe/Berlin")


def berlin_0230(db) -> PeriodicTask:
    crontab = CrontabSchedule.objects.create(minute="30", hour="2", timezone="Europe/Berlin")
    return make_schedule("nightly", crontab=crontab)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # Spring forward on 2026-03-29: 02:30 does not exist; it fires once, at 03:30 CEST.
        (
            datetime(2026, 3, 27, 12, tzinfo=BERLIN),
            ["03-28 02:30 +0100", "03-29 03:30 +0200", "03-30 02:30 +0200", "03-31 02:30 +0200"],
        ),
        # Fall back on 2026-10-25: 02:30 happens twice; it fires once, at the first.
        (
            datetime(2026, 10, 23, 12, tzinfo=BERLIN),
            ["10-24 02:30 +0200", "10-25 02:30 +0200", "10-26 02:30 +0100", "10-27 02:30 +0100"],
        ),
    ],
)
def test_a_0230_berlin_crontab_fires_once_a_day_across_dst_changes(db, now, expected):
    task = berlin_0230(db)

    runs = schedules.next_runs(task, count=4, now=now)

    assert [f"{run:%m-%d %H:%M %z}" for run in runs] == expected
    gaps = {b - a for a, b in itertools.pairwise(runs)}
    assert all(timedelta(hours=23) <= gap <= timedelta(hours=25) for gap in gaps)


def test_dst_notes_name_the_gap_and_the_overlap_of_2026(db):
    task = berlin_0230(db)

    notes = schedules.dst_notes(task, today=date(2026, 1, 1))

    assert [(n.day, n.kind) for n in notes] == [
        (date(2026, 3, 29), "gap"),
        (date(2026, 10, 25), "overlap"),
    ]
    assert "that run happens at 03:30 CEST instead" in notes[0].message
    assert "happens once, at the first 02:30 (CEST)" in notes[1].message


def test_a_crontab_outside_the_dst_hours_has_no_dst_notes(db):
    crontab = CrontabSchedule.objects.create(minute="0", hour="12", timezone="Europe/Berlin")

    assert schedules.dst_notes(make_schedule(crontab=crontab), today=date(2026, 1, 1)) == []


def test_interval_runs_follow_the_last_run(db):
    every, _ = IntervalSchedule.objects.get_or_create(every=10, period="minutes")
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    task = make_schedule(interval=every, last_run_at=now - timedelta(minutes=4))

    runs = schedules.next_runs(task, count=3, now=now)

    assert [f"{run.astimezone(UTC):%H:%M}" for run in runs] == ["12:06", "12:16", "12:26"]


def test_start_time_expiry_one_off_and_disabled_limit_the_next_runs(db):
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    every, _ = IntervalSchedule.objects.get_or_create(every=1, period="hours")
    later = make_schedule("later", interval=every, start_time=now + timedelta(days=1))
    ending = make_schedule(
        "ending", interval=every, last_run_at=now, expires=now + timedelta(hours=2, minutes=30)
    )
    once = make_schedule("once", interval=every, one_off=True)
    off = make_schedule("off", interval=every, enabled=False)

    assert schedules.next_runs(later, count=1, now=now)[0] == now + timedelta(days=1)
    assert len(schedules.next_runs(ending, now=now)) == 2
    assert len(schedules.next_runs(once, now=now)) == 1
    assert schedules.next_runs(off, now=now) == []


def test_solar_runs_are_a_day_apart(db):
    solar = SolarSchedule.objects.create(event="sunrise", latitude=52.52, longitude=13.40)
    task = make_schedule("sunrise", solar=solar)

    runs = schedules.next_runs(task, count=3, now=datetime(2026, 6, 1, 12, tzinfo=UTC))

    assert len(runs) == 3
    assert all(run.astimezone(BERLIN).hour in (4, 5) for run in runs)  # Berlin sunrise in June
