"""Expected vs actual: the slots a schedule should have fired in, and what beat sent.

A slot is an instant the schedule's definition says beat sends it: a crontab's matches
in its time zone (DST as beat does it: jobs.selectors.schedules.crontab_next_runs) or
a clocked schedule's time. Each slot is matched with the runs beat sent for it (Jobs
with source "beat" of this schedule, at their ``eta`` when beat sent ahead, else when
they were recorded) and classified:

- ``on_time``: one run, at most LATE_AFTER after the slot;
- ``late``: one run, later than that (``late_by`` says how much);
- ``doubled``: more than one run for the slot;
- ``missed``: no run, and the slot is more than LATE_AFTER past;
- ``pending``: no run yet, but the slot is too recent to call it missed;
- ``disabled``: the schedule was disabled at the slot (from its versions).

A run belongs to the last slot at or before it (a run up to EARLY before a slot, as
sent ahead with a rounded eta, counts for that slot). Interval and solar schedules
are not compared yet: an interval counts from the last run, so its slots follow the
runs and a missed one cannot be told from the runs alone.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from jobs.models import Job, JobSource, ScheduleVersion
from jobs.selectors.schedules import _celery_crontab, crontab_next_runs, schedule_timezone

LATE_AFTER = timedelta(seconds=60)
EARLY = timedelta(seconds=1)
MAX_SLOTS = 500
PROBLEMS = ("late", "missed", "doubled")


@dataclass(frozen=True)
class Slot:
    at: datetime  # in the schedule's time zone
    status: str
    runs: tuple[Job, ...] = ()
    late_by: timedelta | None = None

    @property
    def late_text(self) -> str:
        """How late, for pages: "7 min", "45 s", "2 h 5 min"."""
        seconds = int(self.late_by.total_seconds()) if self.late_by else 0
        hours, rest = divmod(seconds, 3600)
        minutes, secs = divmod(rest, 60)
        if hours:
            return f"{hours} h {minutes} min" if minutes else f"{hours} h"
        return f"{minutes} min" if minutes else f"{secs} s"

    @property
    def is_problem(self) -> bool:
        return self.status in PROBLEMS


def expected_slots(task: PeriodicTask, *, start: datetime, end: datetime) -> list[datetime] | None:
    """The instants in [start, end] the schedule should have fired at; None: not comparable."""
    if task.crontab_id:
        tz = schedule_timezone(task)
        slots = crontab_next_runs(_celery_crontab(task.crontab), tz, after=start, count=MAX_SLOTS)
        slots = [s for s in slots if s <= end]
    elif task.clocked_id:
        at = task.clocked.clocked_time
        slots = [at] if start <= at <= end else []
    else:
        return None
    if task.start_time:
        slots = [s for s in slots if s >= task.start_time]
    if task.expires:
        slots = [s for s in slots if s < task.expires]
    return slots


def schedule_slots(
    task: PeriodicTask, *, hours: int = 24, now: datetime | None = None
) -> list[Slot] | None:
    """The slots of the last ``hours``, oldest first, each classified; None: not comparable."""
    now = now or timezone.now()
    start = now - timedelta(hours=hours)
    expected = expected_slots(task, start=start, end=now)
    if expected is None:
        return None
    runs = list(
        Job.objects.filter(
            schedule=task, source=JobSource.BEAT, created_at__gte=start - timedelta(hours=1)
        ).order_by("created_at")
    )
    by_slot: dict[int, list[Job]] = {}
    for job in runs:
        fired = _fired_at(job)
        index = bisect_right(expected, fired + EARLY) - 1
        if index >= 0:
            by_slot.setdefault(index, []).append(job)
    disabled = _disabled_periods(task, now=now)
    tz = schedule_timezone(task)
    slots = []
    for index, at in enumerate(expected):
        matched = by_slot.get(index, [])
        slots.append(_classify(at.astimezone(tz), matched, disabled, now))
    return slots


def _fired_at(job: Job) -> datetime:
    return job.eta or job.created_at


def _classify(at: datetime, runs: list[Job], disabled, now: datetime) -> Slot:
    if len(runs) > 1:
        return Slot(at, "doubled", tuple(runs))
    if runs:
        late_by = max(timedelta(0), _fired_at(runs[0]) - at)
        status = "late" if late_by > LATE_AFTER else "on_time"
        return Slot(at, status, tuple(runs), late_by)
    if any(begin <= at < end for begin, end in disabled):
        return Slot(at, "disabled")
    return Slot(at, "missed" if now - at > LATE_AFTER else "pending")


def _disabled_periods(task: PeriodicTask, *, now: datetime) -> list[tuple[datetime, datetime]]:
    """When the schedule was disabled, from its versions (and its current state)."""
    periods = []
    versions = ScheduleVersion.objects.filter(schedule=task).order_by("number")
    first = versions.first()
    off_since = (
        datetime.min.replace(tzinfo=now.tzinfo)
        if first and first.before and not first.before.get("enabled", True)
        else None
    )
    for version in versions.only("created_at", "after"):
        enabled = (version.after or {}).get("enabled", True)
        if not enabled and off_since is None:
            off_since = version.created_at
        elif enabled and off_since is not None:
            periods.append((off_since, version.created_at))
            off_since = None
    if off_since is None and not task.enabled and first is None:
        off_since = datetime.min.replace(tzinfo=now.tzinfo)
    if off_since is not None:
        periods.append((off_since, now + timedelta(days=1)))
    return periods


def problem_count(slots: list[Slot] | None) -> int:
    return sum(1 for slot in slots or [] if slot.is_problem)
