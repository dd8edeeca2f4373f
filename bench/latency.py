"""Idle latency: how long one no-op run takes from submit to started and to its stored end.

    .venv/bin/python -m bench.latency --broker both --runs 200

On an idle system (one worker, prefork -c 2, on the benchmark's queue `bench`; nothing
else submitted), one run at a time: submit it, wait until its final state is stored,
pause --pause seconds, submit the next. Per run, from the wall clock just before
``services.job_submit``:

- submit -> started: the run's ``started_at`` (stamped by the pool process);
- submit -> finished: its ``finished_at`` (the run returned);
- submit -> stored: this process first sees the row SUCCESS (polled every --poll s);
- finished -> stored: what storing the final state adds (group commit's gather wait,
  the statement, the poll's resolution).

Each broker is measured with the worker as configured (group commit on), with
JOBSITE_GROUP_COMMIT=0 (each pool process stores its own final state), and against
raw Celery: ``apply_async`` of ``jobsite.bench_noop`` (no row, no tracking) until its
Redis counter moves, polled the same way. Ratios are against raw Celery's p50 in the
same run.
"""

from __future__ import annotations

import argparse
import time

from bench import common

MODES = {
    "Jobsite (group commit)": {},
    "Jobsite (JOBSITE_GROUP_COMMIT=0)": {"JOBSITE_GROUP_COMMIT": "0"},
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq", "both"], default="both")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between runs")
    parser.add_argument("--poll", type=float, default=0.001, help="seconds between polls")
    args = parser.parse_args(argv)
    common.django_setup()
    print(common.machine(), flush=True)
    from django.conf import settings

    print(f"JOBSITE_GROUP_COMMIT_WAIT_MS = {settings.JOBSITE_GROUP_COMMIT_WAIT_MS}", flush=True)
    brokers = ["redis", "rabbitmq"] if args.broker == "both" else [args.broker]
    rows, results = [], []
    for broker in brokers:
        url = common.BROKERS[broker]
        common.use_broker(url)
        raw = _measure(url, {}, lambda: _raw_run(args.poll), args)
        for mode, env in MODES.items():
            figures = _measure(url, env, lambda: _jobsite_run(args.poll), args)
            results.append({"broker": broker, "mode": mode, **figures})
            for step in ("started", "finished", "stored", "finished -> stored"):
                values = figures[step]
                rows.append([broker, mode, step if "->" in step else f"submit -> {step}",
                             common.median(values), common.percentile(values, 0.95),
                             common.median(values) / common.median(raw["stored"])
                             if step == "stored" else "", ])  # fmt: skip
        results.append({"broker": broker, "mode": "raw", **raw})
        values = raw["stored"]
        rows.append([broker, "raw Celery (apply_async, no row)", "submit -> done",
                     common.median(values), common.percentile(values, 0.95), 1.0])  # fmt: skip
    common.table(
        f"Idle latency: {args.runs} no-op runs one at a time, prefork -c 2 (ms)",
        ["broker", "path", "step", "p50", "p95", "p50 / raw p50"],
        rows,
    )
    return results


def _measure(url: str, env: dict[str, str], one_run, args) -> dict[str, list[float]]:
    common.purge()
    common.forget_noop_runs()
    worker = common.worker(url)
    worker.env = {**worker.env, **env}
    worker.start(" ready.")
    figures: dict[str, list[float]] = {}
    try:
        for number in range(args.runs + 3):
            sample = one_run()
            if number >= 3:  # the first runs warm the pool processes' connections up
                for key, value in sample.items():
                    figures.setdefault(key, []).append(value)
            if worker.process.poll() is not None:
                raise RuntimeError(f"the worker died:\n{worker.output()}")
            time.sleep(args.pause)
    finally:
        worker.stop()
        common.purge()
    return figures


def _jobsite_run(poll: float, timeout: float = 30) -> dict[str, float]:
    from django.contrib.auth.models import User

    from jobs import services
    from jobs.models import Job, JobSource, JobState, JobType

    user, _ = User.objects.get_or_create(
        username="bench", defaults={"is_superuser": True, "is_staff": True}
    )
    job_type = JobType.objects.get(name="noop")
    submitted = time.time()
    job = services.job_submit(job_type=job_type, params={}, user=user,
                              options={"queue": common.QUEUE}, source=JobSource.API)  # fmt: skip
    row = Job.objects.filter(pk=job.pk, state=JobState.SUCCESS)
    deadline = time.monotonic() + timeout
    while not (found := list(row.values_list("started_at", "finished_at"))):
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {job.pk} not stored SUCCESS after {timeout} s")
        time.sleep(poll)
    stored = time.time()
    started_at, finished_at = found[0]
    return {
        "started": (started_at.timestamp() - submitted) * 1000,
        "finished": (finished_at.timestamp() - submitted) * 1000,
        "stored": (stored - submitted) * 1000,
        "finished -> stored": (stored - finished_at.timestamp()) * 1000,
    }


def _raw_run(poll: float, timeout: float = 30) -> dict[str, float]:
    from jobs import redis as jobsite_redis
    from jobs.tasks.benchmark import BENCH_COUNTER_KEY, bench_noop

    redis = jobsite_redis.client()
    before = int(redis.get(BENCH_COUNTER_KEY) or 0)
    submitted = time.time()
    bench_noop.apply_async(ignore_result=True, queue=common.QUEUE)
    deadline = time.monotonic() + timeout
    while int(redis.get(BENCH_COUNTER_KEY) or 0) <= before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"raw run not done after {timeout} s")
        time.sleep(poll)
    return {"stored": (time.time() - submitted) * 1000}


if __name__ == "__main__":
    main()
