"""Reads for the dashboard, the admin index summary and /metrics (the dashboard's selectors).

Every aggregate is time-bounded and starts from an indexed column, so its cost grows
with the runs of the window, not with the table (fast at millions of stored runs):

- ``created_at >= since`` is served by ``job_newest`` (-created_at, -id), or by
  ``job_state_newest`` (state, -created_at, -id) when the state is fixed too.
- Series by finish time read ``job_finished`` (finished_at, state): an index-only
  scan of the window. Runtime and wait percentiles read ``job_started_timings``
  (created_at, covering every column they use). Both count ``*``, not the primary
  key, so that no row has to be fetched from the table.

Aggregates are cached for a few seconds per scope (everyone's, or one user's), so many
open dashboards cost one query per scope and period.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import cast

from django.core.cache import cache
from django.db import connection
from django.db.models import Count, DurationField, F, Max, Q, Sum
from django.db.models.aggregates import Aggregate
from django.db.models.functions import Coalesce, Greatest, TruncHour, TruncMinute
from django.utils import timezone

from jobs.heartbeat import beat_last_seen, workers_heard
from jobs.models import FINISHED_STATES, Job, JobState, JobType
from jobs.selectors.broker import QueueDepth, broker_kind, queue_depths
from jobs.selectors.workers import workers_online

CACHE_SECONDS = 5
FINISH_SLACK = timedelta(hours=6)
DAY = timedelta(hours=24)
# Runs unfinished for longer than this are stale (lost), not "now".
UNFINISHED_WINDOW = timedelta(days=7)
BEAT_WARN_AFTER = 60  # seconds
PERCENTILE_SAMPLE = 5000  # rows read for percentiles where the database cannot compute them
FAILURE_GROUPS = 10
UNFINISHED_STATES = [s for s in JobState.values if s not in FINISHED_STATES]


def _scope(user) -> str:
    return "all" if user.has_perm("jobs.view_all_jobs") else f"user:{user.pk}"


def _cached(user, part: str, compute, timeout: int = CACHE_SECONDS):
    return cache.get_or_set(f"jobsite:stats:{_scope(user)}:{part}", compute, timeout)


# --- Runs by state ---------------------------------------------------------------


def runs_by_state(*, user, now: datetime | None = None) -> dict[str, int]:
    """Unfinished runs (last 7 days) and finished runs (last 24 h), by state."""
    return _cached(user, "states", lambda: _runs_by_state(user, now or timezone.now()))


def _runs_by_state(user, now: datetime) -> dict[str, int]:
    visible = Job.objects.visible_to(user).order_by()
    unfinished = visible.filter(
        state__in=UNFINISHED_STATES, created_at__gte=now - UNFINISHED_WINDOW
    )
    finished = visible.filter(state__in=FINISHED_STATES, created_at__gte=now - DAY)
    counts = dict.fromkeys(JobState.values, 0)
    for qs in (unfinished, finished):
        for row in qs.values("state").annotate(n=Count("pk")):
            counts[row["state"]] = row["n"]
    return counts


# --- Throughput series ---------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    name: str
    step: timedelta
    steps: int
    trunc: type
    label_format: str


PERIODS = {
    "minute": Period("minute", timedelta(minutes=1), 60, TruncMinute, "%H:%M"),
    "hour": Period("hour", timedelta(hours=1), 24, TruncHour, "%d %H:00"),
}


def throughput(*, user, period: str, now: datetime | None = None) -> dict:
    """Finished runs per minute (last hour) or per hour (last day): succeeded, failed, other."""
    spec = PERIODS[period]
    return _cached(user, f"series:{period}", lambda: _throughput(user, spec, now))


def _bucket_starts(spec: Period, now: datetime) -> list[datetime]:
    local = timezone.localtime(now).replace(second=0, microsecond=0)
    if spec.step >= timedelta(hours=1):
        local = local.replace(minute=0)
    return [local - spec.step * i for i in range(spec.steps - 1, -1, -1)]


def _throughput(user, spec: Period, now: datetime | None) -> dict:
    starts = _bucket_starts(spec, now or timezone.now())
    since = starts[0]
    rows = (
        Job.objects.visible_to(user)
        .order_by()
        .filter(finished_at__gte=since)
        .annotate(bucket=spec.trunc("finished_at"))
        .values("bucket", "state")
        .annotate(n=Count("*"))
    )
    index = {start: i for i, start in enumerate(starts)}
    series = {name: [0] * len(starts) for name in ("succeeded", "failed", "other")}
    for row in rows:
        i = index.get(timezone.localtime(row["bucket"]))
        if i is None:
            continue
        name = {JobState.SUCCESS: "succeeded", JobState.FAILURE: "failed"}.get(row["state"])
        series[name or "other"][i] += row["n"]
    return {
        "labels": [start.strftime(spec.label_format) for start in starts],
        "series": series,
    }


# --- Runtime and wait percentiles --------------------------------------------------


class PercentileCont(Aggregate):
    """PostgreSQL's ordered-set aggregate; it works on intervals as well as numbers."""

    function = "PERCENTILE_CONT"
    name = "PercentileCont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"

    def __init__(self, expression, fraction: float, **extra):
        super().__init__(expression, fraction=float(fraction), **extra)


RUNTIME = F("finished_at") - F("started_at")
WAIT = F("started_at") - Greatest("created_at", Coalesce("eta", "created_at"))


@dataclass
class TypeTimings:
    name: str
    runs: int
    runtime_p50: float | None
    runtime_p95: float | None
    wait_p50: float | None
    wait_p95: float | None


def timings(*, user, now: datetime | None = None) -> list[TypeTimings]:
    """p50/p95 runtime and wait per job type over the runs started in the last 24 h."""
    return _cached(user, "timings", lambda: _timings(user, now or timezone.now()))


def _timings(user, now: datetime) -> list[TypeTimings]:
    started = (
        Job.objects.visible_to(user)
        .order_by()
        .filter(created_at__gte=now - DAY, started_at__isnull=False)
    )
    if connection.vendor == "postgresql":
        rows = _timings_in_database(started)
    else:
        rows = _timings_from_sample(started)
    titles = dict(JobType.objects.values_list("task_name", "title"))
    result = [TypeTimings(titles.get(row[0], row[0]), *row[1:]) for row in rows]
    return sorted(result, key=lambda t: t.name.lower())


def _timings_in_database(started) -> list[tuple]:
    def pct(expression, fraction):
        return PercentileCont(expression, fraction, output_field=DurationField())

    rows = started.values("task_name").annotate(
        n=Count("*"),
        r50=pct(RUNTIME, 0.5),
        r95=pct(RUNTIME, 0.95),
        w50=pct(WAIT, 0.5),
        w95=pct(WAIT, 0.95),
    )
    return [
        (row["task_name"], row["n"], *(_seconds(row[k]) for k in ("r50", "r95", "w50", "w95")))
        for row in rows
    ]


def _timings_from_sample(started) -> list[tuple]:
    """SQLite has no percentile aggregate: the newest PERCENTILE_SAMPLE runs, in Python."""
    sample = started.order_by("-created_at").values_list(
        "task_name", "created_at", "eta", "started_at", "finished_at"
    )[:PERCENTILE_SAMPLE]
    runtimes, waits = defaultdict(list), defaultdict(list)
    for name, created, eta, begun, finished in sample:
        waits[name].append((begun - max(created, eta or created)).total_seconds())
        if finished:
            runtimes[name].append((finished - begun).total_seconds())
    return [
        (
            name,
            len(waits[name]),
            percentile(runtimes[name], 0.5),
            percentile(runtimes[name], 0.95),
            percentile(waits[name], 0.5),
            percentile(waits[name], 0.95),
        )
        for name in waits
    ]


def percentile(values: list[float], fraction: float) -> float | None:
    """Linear interpolation between closest ranks: the same as percentile_cont."""
    if not values:
        return None
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _seconds(value: timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


# --- Failures by exception type ----------------------------------------------------


@dataclass
class FailureGroup:
    exception_type: str
    count: int
    last_at: datetime | None
    latest: Job | None


def failure_groups(*, user, now: datetime | None = None) -> list[FailureGroup]:
    """Failed runs of the last 24 h grouped by exception type, most frequent first."""
    return _cached(user, "failures", lambda: _failure_groups(user, now or timezone.now()))


def _failure_groups(user, now: datetime) -> list[FailureGroup]:
    failed = (
        Job.objects.visible_to(user)
        .order_by()
        .filter(state=JobState.FAILURE, created_at__gte=now - DAY)
    )
    groups = (
        failed.values("exception_type")
        .annotate(n=Count("pk"), last=Max("finished_at"))
        .order_by("-n", "exception_type")[:FAILURE_GROUPS]
    )
    # One bounded read of the newest failures gives each group its latest example.
    latest: dict[str, Job] = {}
    newest = failed.order_by("-created_at", "-id").select_related("job_type")[:200]
    for job in newest:
        latest.setdefault(job.exception_type, job)
    return [
        FailureGroup(g["exception_type"], g["n"], g["last"], latest.get(g["exception_type"]))
        for g in groups
    ]


# --- Workers, queues, beat (remote control and broker round trips) -----------------


@dataclass
class SystemStatus:
    broker: str
    workers: list[str]
    queues: list[QueueDepth]
    beat_last_seen: datetime | None

    @property
    def beat_age(self) -> float | None:
        if self.beat_last_seen is None:
            return None
        return max(0.0, (timezone.now() - self.beat_last_seen).total_seconds())

    @property
    def beat_ok(self) -> bool:
        age = self.beat_age
        return age is not None and age <= BEAT_WARN_AFTER


def system_status() -> SystemStatus:
    """Workers online, queue depths and beat's heartbeat; the same for every user.

    Never waits on the workers: queue depths and beat are cheap reads (cached a few
    seconds), the workers are the last ping's answer (see workers_answering).
    """
    # None only for a None default; this one always gives a SystemStatus.
    status = cast(
        SystemStatus, cache.get_or_set("jobsite:stats:system", _system_status, CACHE_SECONDS)
    )
    return replace(status, workers=workers_answering())


def _system_status() -> SystemStatus:
    return SystemStatus(
        broker=broker_kind(), workers=[], queues=queue_depths(), beat_last_seen=beat_last_seen()
    )


WORKERS_KEY = "jobsite:stats:workers"  # (when asked, names that answered)
WORKERS_FRESH = 5.0  # seconds: an older answer is shown while a new ping is on its way
WORKERS_KEPT = 300  # seconds: after this without a request, the next one starts over
REFRESH_LOCK = "jobsite:stats:workers:refreshing"
REFRESH_LOCK_SECONDS = 10  # a ping takes its 1 s timeout at most; this covers a hung one
_refresh: threading.Thread | None = None


def workers_answering() -> list[str]:
    """The workers that answered the last ping, asked again in the background when stale.

    A ping waits for the replies heartbeats make it expect, which is its whole timeout
    while a dead worker still counts as expected: no page or scrape waits for it. Before
    the first answer, the workers whose heartbeat is recent stand in for it.
    """
    entry = cache.get(WORKERS_KEY)
    if entry is None or time.time() - entry[0] > WORKERS_FRESH:
        workers_refresh_in_background()
    if entry is None:
        return workers_heard()
    return entry[1]


def workers_refresh_in_background() -> threading.Thread | None:
    """Start one ping in a thread of this process (none if one is running already)."""
    global _refresh
    if not cache.add(REFRESH_LOCK, True, timeout=REFRESH_LOCK_SECONDS):
        return None
    _refresh = threading.Thread(target=_workers_refresh, name="jobsite-ping", daemon=True)
    _refresh.start()
    return _refresh


def workers_refresh_wait(timeout: float = 5.0) -> None:
    """Wait for a background ping started by this process, if any (tests, benchmarks)."""
    if _refresh is not None:
        _refresh.join(timeout)


def _workers_refresh() -> None:
    try:
        cache.set(WORKERS_KEY, (time.time(), workers_online()), WORKERS_KEPT)
    finally:
        cache.delete(REFRESH_LOCK)


# --- /metrics ------------------------------------------------------------------------

# The job type label of runs of tasks outside the catalogue. Task names come from the
# wire (beat, `celery call`, other producers): one label for all of them keeps the
# number of series bounded by the catalogue, whatever names arrive.
OTHER_LABEL = "other"


def _job_type_labels() -> dict[int | None, str]:
    """JobType id → its name, the label; runs without a job type fall under OTHER_LABEL."""
    return dict(JobType.objects.values_list("pk", "name"))


def runs_by_type_and_state(*, since: datetime) -> Counter:
    """(job type name or OTHER_LABEL, state) → runs submitted since ``since`` (everyone's)."""
    rows = (
        Job.objects.order_by()
        .filter(created_at__gte=since)
        .values("job_type_id", "state")
        .annotate(n=Count("pk"))
    )
    labels = _job_type_labels()
    counts: Counter = Counter()
    for row in rows:
        counts[(labels.get(row["job_type_id"], OTHER_LABEL), row["state"])] += row["n"]
    return counts


def runtime_histogram(*, since: datetime, buckets: tuple[float, ...]) -> dict[str, dict]:
    """Per job type (or OTHER_LABEL): cumulative bucket counts, sum and count of runtimes
    finished since ``since``."""
    finished = Job.objects.order_by().filter(
        created_at__gte=since - FINISH_SLACK,
        finished_at__gte=since,
        started_at__isnull=False,
    )
    counts = {
        f"le_{i}": Count("pk", filter=Q(runtime__lte=timedelta(seconds=bound)))
        for i, bound in enumerate(buckets)
    }
    rows = (
        finished.annotate(runtime=RUNTIME)
        .values("job_type_id")
        .annotate(n=Count("pk"), total=Sum("runtime"), **counts)
        .values_list("job_type_id", "n", "total", *counts)
    )
    labels = _job_type_labels()
    histogram: dict[str, dict] = {}
    for job_type_id, n, total, *cumulative in rows:
        label = labels.get(job_type_id, OTHER_LABEL)
        data = histogram.setdefault(label, {"count": 0, "sum": 0.0, "buckets": [0] * len(buckets)})
        data["count"] += n
        data["sum"] += _seconds(total) or 0.0
        data["buckets"] = [a + b for a, b in zip(data["buckets"], cumulative, strict=True)]
    return histogram
