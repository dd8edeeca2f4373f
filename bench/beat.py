"""Beat at scale: how late 10,000 schedules are sent, Jobsite's scheduler vs the stock one.

    .venv/bin/python -m bench.beat --schedules 10000 --seconds 90

Creates --schedules enabled periodic tasks running the `noop` job type: half intervals
(every 10-60 s), half crontabs (every minute). Runs `celery beat` for --seconds with
Jobsite's scheduler (jobs.beat:JobsiteScheduler), then with django-celery-beat's stock
DatabaseScheduler, on the same schedules (no worker: only publishing is measured; the
queue is purged afterwards).

Both run as a subclass (bench.beat_probe) that, for every entry it sends, records
lag = (time the run became runnable) - (the time the entry was due), the due time being
what the entry's own schedule says (``remaining_estimate`` of its last run). A run is
runnable when its publish returned, or, if Jobsite's scheduler sent it ahead with its
due time as ETA (JOBSITE_BEAT_LEAD), at that ETA when the publish returned before it.
Beat's CPU is its process's user + system time over the wall time (psutil).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import common

PREFIX = "bench-beat-"
SCHEDULERS = {
    "Jobsite (JobsiteScheduler)": "bench.beat_probe:ProbeJobsiteScheduler",
    "stock (DatabaseScheduler)": "bench.beat_probe:ProbeDatabaseScheduler",
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument(
        "--only", choices=["jobsite", "stock"], help="run one scheduler (default: both)"
    )
    parser.add_argument(
        "--start-before-minute", type=float, metavar="S",
        help="start beat S seconds before a minute begins, when the crontabs fall due "
        "(the start-up case; default: as soon as the schedules are made)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    url = common.BROKERS[args.broker]
    common.django_setup(url)
    print(common.machine(), flush=True)
    make_schedules(args.schedules)
    results = {}
    try:
        for label, scheduler in SCHEDULERS.items():
            if args.only and not label.lower().startswith(args.only):
                continue
            common.purge()
            results[label] = run_beat(url, scheduler, args.seconds, args.start_before_minute)
    finally:
        common.purge()
        remove_schedules()
    rows = [[label, r["sent"], r["p50"], r["p95"], r["max"], r["ahead"], r["early"], r["cpu"],
             r["startup"]] for label, r in results.items()]  # fmt: skip
    common.table(
        f"Beat: {args.schedules:,} schedules for {args.seconds:g} s "
        "(lag in seconds: runnable - due; runnable = sent, or its ETA if sent before it)",
        ["scheduler", "sent", "lag p50", "lag p95", "lag max", "sent ahead",
         "ahead by p50 s", "CPU %", "start-up s"],
        rows,
    )  # fmt: skip
    return results


def make_schedules(count: int) -> None:
    from django_celery_beat.models import (
        CrontabSchedule,
        IntervalSchedule,
        PeriodicTask,
        PeriodicTasks,
    )

    remove_schedules()
    every_minute, _ = CrontabSchedule.objects.get_or_create(
        minute="*", hour="*", day_of_week="*", day_of_month="*", month_of_year="*",
        timezone="UTC",
    )  # fmt: skip
    intervals = [
        IntervalSchedule.objects.get_or_create(every=seconds, period=IntervalSchedule.SECONDS)[0]
        for seconds in range(10, 61)
    ]
    made = datetime.datetime.now(datetime.UTC)
    tasks = []
    for i in range(count):
        schedule = (
            {"interval": intervals[i % len(intervals)]} if i % 2 else {"crontab": every_minute}
        )
        # As if each had run when made: no run to catch up on when beat starts, however
        # long after (--start-before-minute), so only beat's own lateness is measured.
        tasks.append(PeriodicTask(name=f"{PREFIX}{i:05d}", task="jobs.noop", kwargs="{}",
                                  queue=common.QUEUE, last_run_at=made, **schedule))  # fmt: skip
    PeriodicTask.objects.bulk_create(tasks, batch_size=2000)
    PeriodicTasks.update_changed()


def _as_if_run_now() -> None:
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    PeriodicTask.objects.filter(name__startswith=PREFIX).update(
        last_run_at=datetime.datetime.now(datetime.UTC)
    )
    PeriodicTasks.update_changed()


def remove_schedules() -> None:
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    PeriodicTask.objects.filter(name__startswith=PREFIX).delete()
    PeriodicTasks.update_changed()


def run_beat(url: str, scheduler: str, seconds: float, before_minute: float | None = None) -> dict:
    import psutil

    lag_file = Path(tempfile.mkdtemp(prefix="jobsite-bench-beat-")) / "lag.txt"
    env = {**common.bench_env(url), "BENCH_BEAT_LAG_FILE": str(lag_file),
           "DJANGO_LOG_LEVEL": "INFO"}  # fmt: skip
    argv = [sys.executable, "-m", "celery", "-A", "jobsite", "beat", "-S", scheduler,
            "--loglevel=INFO", "--pidfile=",
            f"--schedule={lag_file.parent / 'schedule'}"]  # fmt: skip
    beat = common.Process(argv, env, "beat")
    if before_minute is not None:
        now = time.time()
        start = (now // 60 + 1) * 60 - before_minute
        while start < now + 3:
            start += 60
        time.sleep(start - 2 - now)
        _as_if_run_now()  # made more than a minute ago, they would have runs to catch up
        time.sleep(max(0.0, start - time.time()))
    started = time.monotonic()
    beat.start("beat: Starting...")
    # Start-up: until the first schedule was sent (10,000 entries are read first).
    while not lag_file.exists() and time.monotonic() - started < seconds:
        time.sleep(0.05)
    startup = time.monotonic() - started
    process = psutil.Process(beat.pid)
    cpu_before, wall_before = process.cpu_times(), time.monotonic()
    time.sleep(max(0.0, seconds - startup))
    cpu_after, wall_after = process.cpu_times(), time.monotonic()
    beat.stop()
    rows = [line.split() for line in _lines(lag_file) if line.startswith(PREFIX)]
    lags = [float(row[1]) for row in rows]
    early = [float(row[2]) for row in rows]
    used = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    if not lags:
        print(beat.output(), flush=True)
    return {
        "sent": len(lags),
        "p50": common.median(lags),
        "p95": common.percentile(lags, 0.95),
        "max": max(lags, default=float("nan")),
        "ahead": sum(1 for seconds in early if seconds > 0),
        "early": common.median([seconds for seconds in early if seconds > 0] or [0.0]),
        "cpu": 100 * used / (wall_after - wall_before),
        "startup": startup,
    }


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    main()
