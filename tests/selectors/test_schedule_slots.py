"""Expected vs actual slots of a schedule (jobs.selectors.schedule_slots), DST included."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
)

from jobs.models import AuditAction, Job, JobSource, ScheduleVersion
from jobs.selectors.schedule_slots import expected_slots, problem_count, schedule_slots

pytestmark = pytest.mark.django_db


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def cron(minute: str, hour: str, tz: str) -> PeriodicTask:
    crontab = CrontabSchedule.objects.create(minute=minute, hour=hour, timezone=tz)
    return PeriodicTask.objects.create(
        name=f"c{crontab.pk}", task="jobs.count_primes", crontab=crontab
    )


def sent(task: PeriodicTask, at: datetime, *, eta: bool = False) -> Job:
    job = Job.objects.create(
        id=str(uuid.uuid4()), task_name=task.task, schedule=task, schedule_name=task.name,
        source=JobSource.BEAT, eta=at if eta else None,
    )  # fmt: skip
    Job.objects.filter(pk=job.pk).update(created_at=at - timedelta(seconds=5) if eta else at)
    return job


def test_berlin_spring_forward_fires_the_missing_0230_at_0330_cest():
    task = cron("30", "2", "Europe/Berlin")  # 2026-03-29: 02:00 CET becomes 03:00 CEST

    slots = expected_slots(task, start=utc(2026, 3, 27, 12), end=utc(2026, 3, 30, 12))

    assert slots == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 30), utc(2026, 3, 30, 0, 30)]


def test_berlin_fall_back_fires_the_doubled_0230_once():
    task = cron("30", "2", "Europe/Berlin")  # 2026-10-25: 03:00 CEST becomes 02:00 CET

    slots = expected_slots(task, start=utc(2026, 10, 24, 12), end=utc(2026, 10, 25, 12))

    assert slots == [utc(2026, 10, 25, 0, 30)]  # 02:30 CEST, the first of the two


def test_new_york_fall_back_fires_0130_once_and_spring_forward_at_0330():
    task = cron("30", "1,2", "America/New_York")

    fall = expected_slots(task, start=utc(2026, 11, 1, 4), end=utc(2026, 11, 1, 9))
    spring = expected_slots(task, start=utc(2026, 3, 8, 4), end=utc(2026, 3, 8, 9))

    # 01:30 EDT once (05:30 UTC), then 02:30 EST (07:30 UTC).
    assert fall == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 7, 30)]
    # 01:30 EST (06:30 UTC); 02:30 does not exist and fires at 03:30 EDT (07:30 UTC).
    assert spring == [utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 7, 30)]


def test_slots_are_classified_on_time_late_missed_doubled_and_pending():
    task = cron("0", "*", "Europe/Berlin")  # hourly, on the hour
    now = utc(2026, 6, 1, 12, 0, 30)
    sent(task, utc(2026, 6, 1, 8, 0, 2))  # on time
    sent(task, utc(2026, 6, 1, 9, 0), eta=True)  # sent ahead: on time at its eta
    sent(task, utc(2026, 6, 1, 10, 7))  # 7 minutes late
    # 11:00 missed
    sent(task, utc(2026, 6, 1, 7, 0, 1))
    sent(task, utc(2026, 6, 1, 7, 0, 3))  # doubled
    # 12:00 is 30 s ago: pending

    slots = schedule_slots(task, hours=5, now=now)

    by_hour = {s.at.astimezone(UTC).hour: s for s in slots}
    assert {h: s.status for h, s in by_hour.items()} == {
        8: "on_time", 9: "on_time", 10: "late", 11: "missed", 12: "pending",
    }  # fmt: skip
    assert by_hour[10].late_by == timedelta(minutes=7)
    wider = schedule_slots(task, hours=6, now=now)
    assert wider[0].status == "doubled" and len(wider[0].runs) == 2
    assert problem_count(wider) == 3  # doubled, late, missed


def test_slots_while_disabled_are_skipped_not_missed():
    task = cron("0", "*", "UTC")
    now = utc(2026, 6, 1, 12, 0, 30)
    ScheduleVersion.objects.create(
        schedule=task, schedule_name=task.name, number=1, action=AuditAction.SCHEDULE_DISABLE,
        before={"enabled": True}, after={"enabled": False}, created_at=utc(2026, 6, 1, 9, 30),
    )  # fmt: skip
    ScheduleVersion.objects.create(
        schedule=task, schedule_name=task.name, number=2, action=AuditAction.SCHEDULE_ENABLE,
        before={"enabled": False}, after={"enabled": True}, created_at=utc(2026, 6, 1, 10, 30),
    )  # fmt: skip

    slots = schedule_slots(task, hours=3, now=now)

    assert [(s.at.hour, s.status) for s in slots] == [
        (10, "disabled"), (11, "missed"), (12, "pending"),
    ]  # fmt: skip


def test_a_clocked_schedule_has_one_slot_and_an_interval_is_not_compared():
    clocked = ClockedSchedule.objects.create(clocked_time=utc(2026, 6, 1, 9))
    once = PeriodicTask.objects.create(
        name="once", task="jobs.count_primes", clocked=clocked, one_off=True
    )
    hourly = IntervalSchedule.objects.create(every=1, period="hours")
    every = PeriodicTask.objects.create(name="every", task="jobs.count_primes", interval=hourly)

    assert [s.status for s in schedule_slots(once, now=utc(2026, 6, 1, 12))] == ["missed"]
    assert schedule_slots(every, now=utc(2026, 6, 1, 12)) is None


def test_the_schedule_page_shows_the_timeline(admin_client, job_types):
    from django.urls import reverse

    task = cron("*/10", "*", "UTC")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    last = now.replace(minute=now.minute - now.minute % 10)
    sent(task, last - timedelta(minutes=20) + timedelta(minutes=4))  # late by 4 min
    sent(task, last - timedelta(minutes=30))  # on time
    # last - 10 min: missed

    url = reverse("admin:django_celery_beat_periodictask_change", args=[task.pk])
    page = admin_client.get(url).content.decode()

    assert 'id="timeline"' in page and "Expected vs actual" in page
    assert 'class="slot slot-late"' in page and "late 4 min" in page
    assert 'class="slot slot-missed"' in page and 'class="slot slot-on_time"' in page
