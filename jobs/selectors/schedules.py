"""Schedule logic for the admin: next run times, crontabs in words, DST warnings, runs.

Reads only; writes (save, enable, run now) are in jobs/services.py. The computations
follow what Celery beat does with django-celery-beat's schedules, so that what the
admin shows is what beat will fire:

- a crontab time is wall-clock time in the crontab's time zone; a time that does not
  exist (spring forward) fires at the same offset as before the change (02:30 becomes
  03:30 in Europe/Berlin), and a time that happens twice (fall back) fires once, at its
  first occurrence: Celery's crontab does the same (fold=0 in PEP 495 terms);
- Celery's crontab needs day of month AND day of week to match (not cron's OR).
"""

from __future__ import annotations

import json
import time as clock
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from celery import schedules as celery_schedules
from cron_descriptor import (
    ExpressionDescriptor,
    FormatException,
    MissingFieldException,
    Options,
    WrongArgumentException,
)
from django.conf import settings
from django.utils import timezone
from django_celery_beat import models as beat_models
from django_celery_beat.models import CrontabSchedule, PeriodicTask, cronexp

from jobs import heartbeat, specs
from jobs.models import Job, ScheduleVersion

# A crontab that never matches (31 February) must not scan forever.
MAX_DAYS_SCANNED = 5 * 366
DST_LOOKAHEAD_DAYS = 366


# --- Time zones and words ---------------------------------------------------------


def schedule_timezone(task: PeriodicTask) -> ZoneInfo:
    """A crontab's own time zone; Celery's time zone for every other kind."""
    if task.crontab_id and task.crontab.timezone:
        return ZoneInfo(str(task.crontab.timezone))
    return ZoneInfo(settings.CELERY_TIMEZONE)


def crontab_expression(crontab: CrontabSchedule) -> str:
    return " ".join(
        cronexp(value)
        for value in (
            crontab.minute,
            crontab.hour,
            crontab.day_of_month,
            crontab.month_of_year,
            crontab.day_of_week,
        )
    )


def crontab_in_words(crontab: CrontabSchedule) -> str:
    """ "At 02:30, Monday through Friday (Europe/Berlin)", via cron-descriptor."""
    expression = crontab_expression(crontab)
    options = Options()
    options.use_24hour_time_format = True
    try:
        words = ExpressionDescriptor(expression, options).get_description()
    except (FormatException, MissingFieldException, WrongArgumentException):
        words = expression
    return f"{words} ({crontab.timezone})"


def describe(task: PeriodicTask) -> str:
    """The schedule in words, whatever its kind."""
    if task.interval_id:
        return str(task.interval)
    if task.crontab_id:
        return crontab_in_words(task.crontab)
    if task.solar_id:
        return str(task.solar)
    if task.clocked_id:
        when = timezone.localtime(task.clocked.clocked_time, schedule_timezone(task))
        return f"once, at {when:%Y-%m-%d %H:%M %Z}"
    return "no schedule"


# --- Next run times ---------------------------------------------------------------


def next_runs(task: PeriodicTask, *, count: int = 5, now: datetime | None = None) -> list[datetime]:
    """The next ``count`` times beat will send this schedule, in the schedule's time zone.

    Empty when the schedule is disabled, expired, or a one-off that already ran.
    """
    now = now or timezone.now()
    if not task.enabled or (task.expires and task.expires <= now):
        return []
    if task.one_off and task.total_run_count:
        return []
    after = max(now, task.start_time) if task.start_time else now
    runs = _raw_next_runs(task, after=after, now=now, count=1 if task.one_off else count)
    if task.expires:
        runs = [run for run in runs if run < task.expires]
    tz = schedule_timezone(task)
    return [run.astimezone(tz) for run in runs]


def _raw_next_runs(task: PeriodicTask, *, after: datetime, now: datetime, count: int):
    if task.interval_id:
        return _interval_runs(task, after=after, count=count)
    if task.crontab_id:
        return crontab_next_runs(
            _celery_crontab(task.crontab), schedule_timezone(task), after=after, count=count
        )
    if task.solar_id:
        return _solar_runs(task, after=after, count=count)
    if task.clocked_id:
        # Beat sends a clocked schedule that is past and has not run yet at once.
        return [max(task.clocked.clocked_time, after)]
    return []


def _interval_runs(task: PeriodicTask, *, after: datetime, count: int) -> list[datetime]:
    every = timedelta(**{task.interval.period: task.interval.every})
    if task.last_run_at:
        first = task.last_run_at + every
    elif task.start_time:
        first = task.start_time
    else:
        # Beat counts a schedule that never ran from its last change.
        first = (task.date_changed or after) + every
    first = max(first, after)  # overdue: beat sends it at its next tick
    return [first + every * n for n in range(count)]


def _solar_runs(task: PeriodicTask, *, after: datetime, count: int) -> list[datetime]:
    solar = task.solar
    schedule = celery_schedules.solar(
        solar.event, float(solar.latitude), float(solar.longitude), nowfun=lambda: after
    )
    runs: list[datetime] = []
    last = after
    for _ in range(count):
        run = after + schedule.remaining_estimate(last)
        if runs and run <= runs[-1]:
            break
        runs.append(run)
        last = run + timedelta(minutes=1)
    return runs


def _celery_crontab(crontab: CrontabSchedule) -> celery_schedules.crontab:
    return celery_schedules.crontab(
        minute=crontab.minute,
        hour=crontab.hour,
        day_of_week=crontab.day_of_week,
        day_of_month=crontab.day_of_month,
        month_of_year=crontab.month_of_year,
    )


def crontab_next_runs(
    cron: celery_schedules.crontab, tz: ZoneInfo, *, after: datetime, count: int
) -> list[datetime]:
    """The next ``count`` instants at or after ``after`` that the crontab matches in ``tz``."""
    runs: list[datetime] = []
    day = after.astimezone(tz).date()
    times = _day_times(cron)
    for _ in range(MAX_DAYS_SCANNED):
        if _day_matches(cron, day):
            # A set: in a gap two wall times can land on the same instant; fire once.
            instants = sorted({_resolve(datetime.combine(day, t), tz) for t in times})
            runs.extend(at for at in instants if at >= after)
            if len(runs) >= count:
                return runs[:count]
        day += timedelta(days=1)
    return runs


def _day_times(cron: celery_schedules.crontab) -> list[time]:
    # crontab's expanded sets (hour, minute, ...) are set in its __init__; celery-types omit them.
    hours, minutes = cron.hour, cron.minute  # type: ignore[attr-defined]
    return [time(hour, minute) for hour in sorted(hours) for minute in sorted(minutes)]


def _day_matches(cron: celery_schedules.crontab, day: date) -> bool:
    cron_weekday = (day.weekday() + 1) % 7  # cron counts from Sunday = 0
    # As in _day_times: the stubs omit crontab's expanded sets.
    return (
        day.month in cron.month_of_year  # type: ignore[attr-defined]
        and day.day in cron.day_of_month  # type: ignore[attr-defined]
        and cron_weekday in cron.day_of_week  # type: ignore[attr-defined]
    )


def _resolve(wall: datetime, tz: ZoneInfo) -> datetime:
    """Wall-clock time to an instant as Celery does: the first one (fold=0)."""
    return wall.replace(tzinfo=tz, fold=0).astimezone(UTC)


# --- DST gaps and overlaps --------------------------------------------------------


@dataclass(frozen=True)
class DstNote:
    day: date
    wall: time
    kind: str  # "gap" or "overlap"
    message: str


def dst_notes(
    task: PeriodicTask, *, today: date | None = None, days: int = DST_LOOKAHEAD_DAYS
) -> list[DstNote]:
    """Crontab times in the coming year that fall in a DST gap or overlap of its zone."""
    if not task.crontab_id:
        return []
    tz = schedule_timezone(task)
    cron = _celery_crontab(task.crontab)
    start = today or timezone.now().astimezone(tz).date()
    notes = []
    for day in _transition_days(tz, start, days):
        if not _day_matches(cron, day):
            continue
        for wall_time in _day_times(cron):
            note = _dst_note(datetime.combine(day, wall_time), tz)
            if note:
                notes.append(note)
    return notes


def _transition_days(tz: ZoneInfo, start: date, days: int) -> list[date]:
    """Days whose UTC offset at the end differs from the offset at their start."""
    found = []
    for n in range(days):
        day = start + timedelta(days=n)
        begin = datetime.combine(day, time()).replace(tzinfo=tz).utcoffset()
        end = datetime.combine(day, time(23, 59, 59)).replace(tzinfo=tz).utcoffset()
        if begin != end:
            found.append(day)
    return found


def _dst_note(wall: datetime, tz: ZoneInfo) -> DstNote | None:
    first = wall.replace(tzinfo=tz, fold=0)
    second = wall.replace(tzinfo=tz, fold=1)
    if first.utcoffset() == second.utcoffset():
        return None
    fired = first.astimezone(UTC).astimezone(tz)
    when = f"{wall:%H:%M} on {wall:%a %d %b %Y}"
    if fired.replace(tzinfo=None) != wall:
        message = (
            f"{when} does not exist in {tz.key} (clocks go forward): "
            f"that run happens at {fired:%H:%M %Z} instead."
        )
        return DstNote(wall.date(), wall.time(), "gap", message)
    message = (
        f"{when} happens twice in {tz.key} (clocks go back): "
        f"that run happens once, at the first {wall:%H:%M} ({first:%Z})."
    )
    return DstNote(wall.date(), wall.time(), "overlap", message)


# --- Runs and beat ----------------------------------------------------------------


def schedule_runs(task: PeriodicTask, *, limit: int = 20) -> list[Job]:
    """The schedule's runs, newest first (served by the job_schedule_newest index)."""
    return list(
        Job.objects.filter(schedule=task)
        .select_related("submitted_by", "job_type")
        .order_by("-created_at", "-id")[:limit]
    )


@dataclass(frozen=True)
class BeatProcess:
    """One beat as it reported itself on its last tick (jobs.heartbeat.beat_report)."""

    host: str
    pid: int
    role: str  # "active" (holds the lock) or "standby"
    since: datetime
    tick_age: int  # seconds since its last tick
    sent_age: int | None  # seconds since it last sent a run
    silent: bool  # no tick for over a lock TTL: killed, or cut off

    @property
    def name(self) -> str:
        return f"{self.host} (pid {self.pid})"


@dataclass(frozen=True)
class BeatStatus:
    last_seen: datetime | None
    age_seconds: int | None
    running: bool
    processes: tuple[BeatProcess, ...] = ()

    @property
    def leader(self) -> BeatProcess | None:
        """The beat that holds the lock now: active and ticking within a lock TTL."""
        return next((p for p in self.processes if p.role == "active" and not p.silent), None)

    @property
    def standby(self) -> list[BeatProcess]:
        return [p for p in self.processes if p.role == "standby" and not p.silent]

    @property
    def silent(self) -> list[BeatProcess]:
        """Beats gone quiet: no tick for a lock TTL, or active once and overtaken (the
        lock is another's: a killed leader's last report still says active)."""
        leader = self.leader
        return [p for p in self.processes
                if p.silent or (p.role == "active" and p is not leader)]  # fmt: skip


def beat_processes(*, now: float | None = None) -> tuple[BeatProcess, ...]:
    """Every beat that reported lately, the latest tick first."""
    now = clock.time() if now is None else now
    ttl = settings.JOBSITE_BEAT_LOCK_TTL
    found = []
    for report in heartbeat.beats_reported(now):
        try:
            tick_age = max(0, int(now - float(report["tick"])))
            sent = report.get("sent")
            found.append(BeatProcess(
                host=str(report["host"]), pid=int(report["pid"]), role=str(report["role"]),
                since=datetime.fromtimestamp(float(report["since"]), tz=UTC),
                tick_age=tick_age,
                sent_age=None if sent is None else max(0, int(now - float(sent))),
                silent=tick_age > ttl,
            ))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            continue
    return tuple(found)


def beat_status(*, now: datetime | None = None) -> BeatStatus:
    """Beat is running if it marked its heartbeat within one lock TTL (it does every tick)."""
    processes = beat_processes()
    last_seen = heartbeat.beat_last_seen()
    if last_seen is None:
        return BeatStatus(None, None, False, processes)
    age = max(0, int(((now or timezone.now()) - last_seen).total_seconds()))
    return BeatStatus(last_seen, age, age <= settings.JOBSITE_BEAT_LOCK_TTL, processes)


# --- Versions -------------------------------------------------------------------------

# A snapshot is every field a person sets on a schedule, as plain JSON: the time
# fields as ids, the parameters and headers as JSON objects. Beat's own bookkeeping
# (last_run_at, total_run_count, date_changed) is not a change and is left out.

SNAPSHOT_FIELDS = (
    "name", "task", "kwargs", "enabled", "description", "interval", "crontab", "solar",
    "clocked", "start_time", "one_off", "expires", "expire_seconds", "queue", "exchange",
    "routing_key", "priority", "headers",
)  # fmt: skip
SCHEDULE_KINDS = ("interval", "crontab", "solar", "clocked")
JSON_FIELDS = ("kwargs", "headers")
TIME_FIELDS = ("start_time", "expires")


def schedule_snapshot(schedule) -> dict:
    """The fields of a schedule a version keeps (empty for None)."""
    if schedule is None:
        return {}
    snapshot: dict = {}
    for name in SNAPSHOT_FIELDS:
        if name in SCHEDULE_KINDS:
            snapshot[name] = getattr(schedule, f"{name}_id")
        elif name in JSON_FIELDS:
            snapshot[name] = loads_object(getattr(schedule, name))
        elif name in TIME_FIELDS:
            value = getattr(schedule, name)
            snapshot[name] = value.isoformat() if value else None
        else:
            snapshot[name] = getattr(schedule, name)
    return specs.to_json(snapshot)


def loads_object(raw: str | None) -> dict:
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


VERSION_LIMIT = 50
_FIELD_LABELS = {
    "name": "name", "task": "job type", "enabled": "enabled", "description": "description",
    "interval": "interval", "crontab": "crontab", "solar": "solar", "clocked": "clocked",
    "start_time": "start time", "one_off": "one-off", "expires": "expires",
    "expire_seconds": "expiry seconds", "queue": "queue", "exchange": "exchange",
    "routing_key": "routing key", "priority": "priority", "headers": "message headers",
}  # fmt: skip
_KIND_MODELS = {
    "interval": beat_models.IntervalSchedule,
    "crontab": beat_models.CrontabSchedule,
    "solar": beat_models.SolarSchedule,
    "clocked": beat_models.ClockedSchedule,
}


@dataclass(frozen=True)
class DiffRow:
    field: str
    before: str
    after: str


@dataclass(frozen=True)
class VersionView:
    version: ScheduleVersion
    rows: list[DiffRow]
    is_current: bool  # the schedule is as this version left it: nothing to restore


def schedule_versions(task: PeriodicTask, *, limit: int = VERSION_LIMIT) -> list[VersionView]:
    """The schedule's versions, newest first, each with its diff (secret parameters masked)."""
    versions = list(
        ScheduleVersion.objects.filter(schedule=task)
        .select_related("restored_from")
        .order_by("-number")[:limit]
    )
    current = schedule_snapshot(task)
    names: dict[tuple[str, int], str] = {}
    return [
        VersionView(
            v, version_diff(v, names=names), is_current=bool(v.after) and v.after == current
        )
        for v in versions
    ]


def version_diff(version: ScheduleVersion, *, names: dict | None = None) -> list[DiffRow]:
    """What a version changed, one row per field (per parameter for the parameters)."""
    names = {} if names is None else names
    before, after = version.before or {}, version.after or {}
    spec = specs.by_task_name(after.get("task") or before.get("task") or "")
    rows: list[DiffRow] = []
    for key in version.changed or []:
        if not before and after.get(key) in (None, "", {}):
            continue  # a creation lists what was set, not every empty field
        if key == "kwargs":
            rows.extend(
                _params_rows(before.get("kwargs"), after.get("kwargs"), spec, before, after)
            )
            continue
        rows.append(
            DiffRow(
                _FIELD_LABELS.get(key, key),
                _value_text(key, before, names),
                _value_text(key, after, names),
            )
        )
    return rows


def _params_rows(old, new, spec, before: dict, after: dict) -> list[DiffRow]:
    old = old if isinstance(old, dict) else {}
    new = new if isinstance(new, dict) else {}
    secret = set(spec.secret_fields) if spec else set()
    rows = []
    for name in sorted({*old, *new}):
        if old.get(name) == new.get(name) and (name in old) == (name in new):
            continue

        def text(params: dict, side: dict, name=name) -> str:
            if not side:
                return ""
            if name not in params:
                return "—"
            if name in secret and params[name] not in ("", None):
                return specs.MASK  # the row itself says that it changed
            return json.dumps(params[name])

        rows.append(DiffRow(f"parameter {name}", text(old, before), text(new, after)))
    return rows


def _value_text(key: str, snapshot: dict, names: dict) -> str:
    if not snapshot:
        return ""
    value = snapshot.get(key)
    if value is None:
        return "—"
    if key in _KIND_MODELS:
        cache_key = (key, value)
        if cache_key not in names:
            obj = _KIND_MODELS[key].objects.filter(pk=value).first()
            names[cache_key] = str(obj) if obj else f"#{value} (deleted)"
        return names[cache_key]
    if key == "task":
        spec = specs.by_task_name(value)
        return spec.title if spec else value
    if key == "headers":
        return json.dumps(value, sort_keys=True) if value else "{}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
