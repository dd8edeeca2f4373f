"""Retention at scale: Jobsite's batched cleanup against one big ORM delete.

    .venv/bin/python -m bench.retention --runs 1000000 --baseline-runs 100000

Uses its own database (bench_retention; BENCH_RETENTION_DATABASE_URL), which it creates
and migrates, because it deletes everything it generates. Fills --runs runs (with log
lines) and as many TaskResult rows, all past their retention, then times
``services.jobs_cleanup`` and measures its memory (peak Python allocations with
tracemalloc, and the process's peak RSS growth) and its longest transaction (how long
one batch holds its row locks).

Baseline, in the same run: what django-celery-results' ``delete_expired`` and a
plain ``Job.objects.filter(...).delete()`` do — one transaction, Django's collector
loading every row (and its relations) first — on --baseline-runs rows.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from datetime import timedelta

from bench import common

DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/bench_retention"
LOGS_SQL = """
INSERT INTO jobs_joblog (job_id, created_at, level, logger, message)
SELECT id, created_at, 'INFO', 'jobs.tasks', 'line ' || n
FROM jobs_job, generate_series(1, 3) AS n
WHERE ascii(right(id, 1)) % 10 = 0
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--baseline-runs", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args(argv)

    _prepare_database()
    common.django_setup()
    print(common.machine(), flush=True)
    jobsite = _measure(args.runs, lambda now: _jobsite_cleanup(now, args.batch))
    baseline = _measure(args.baseline_runs, _orm_delete)
    rows = []
    for label, figures in (("Jobsite jobs_cleanup (batched)", jobsite),
                           ("ORM delete, one transaction (baseline)", baseline)):  # fmt: skip
        per_100k = figures["peak_python_mb"] * 100_000 / max(figures["runs"], 1)
        rows.append([label, figures["runs"], figures["seconds"],
                     figures["runs"] / figures["seconds"], figures["peak_python_mb"],
                     per_100k, figures["rss_growth_mb"], figures["longest_tx_s"]])  # fmt: skip
    common.table(
        "Retention: deleting runs, their logs and TaskResult rows past retention",
        ["method", "runs", "seconds", "runs/s", "peak Python MB", "MB per 100k runs",
         "RSS growth MB", "longest transaction s"],
        rows,
    )  # fmt: skip
    ratio = (baseline["peak_python_mb"] / max(baseline["runs"], 1)) / max(
        jobsite["peak_python_mb"] / max(jobsite["runs"], 1), 1e-9
    )
    print(f"\nMemory per run, baseline / Jobsite: {ratio:,.0f}x", flush=True)
    return {"jobsite": jobsite, "baseline": baseline}


def _prepare_database() -> None:
    url = os.environ.setdefault("BENCH_RETENTION_DATABASE_URL", DEFAULT_DB)
    common.DATABASE_URL = url
    name = url.rsplit("/", 1)[-1]
    subprocess.run(
        ["createdb", "-h", "127.0.0.1", "-U", "postgres", name], capture_output=True, check=False
    )  # fmt: skip  (exists already: fine)
    env = {**common.bench_env(), "DATABASE_URL": url}
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
                   cwd=common.ROOT, env=env, check=True)  # fmt: skip


def _measure(runs: int, delete) -> dict:
    from django.db import connection
    from django.utils import timezone

    from bench import history_data

    history_data.generate(runs=runs, results=runs, regenerate=True)
    with connection.cursor() as cursor:
        cursor.execute(LOGS_SQL)
    future = timezone.now() + timedelta(days=400)  # every generated row is past retention
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    started = time.perf_counter()
    longest = delete(future)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from jobs.models import Job

    assert not Job.objects.exists(), "the cleanup left runs behind"
    return {
        "runs": runs,
        "seconds": seconds,
        "peak_python_mb": peak / 2**20,
        "rss_growth_mb": max(0, rss_after - rss_before) / 1024,
        "longest_tx_s": longest,
    }


def _jobsite_cleanup(now, batch: int) -> float:
    """jobs_cleanup, timing each batch's transaction through a patched atomic()."""
    from django.db import transaction

    from jobs import services

    longest = 0.0
    real_atomic = transaction.atomic

    class TimedAtomic:
        def __init__(self, *args, **kwargs):
            self.inner = real_atomic(*args, **kwargs)

        def __enter__(self):
            self.started = time.perf_counter()
            return self.inner.__enter__()

        def __exit__(self, *exc):
            nonlocal longest
            result = self.inner.__exit__(*exc)
            longest = max(longest, time.perf_counter() - self.started)
            return result

    transaction.atomic = TimedAtomic
    try:
        services.jobs_cleanup(batch=batch, now=now)
    finally:
        transaction.atomic = real_atomic
    return longest


def _orm_delete(now) -> float:
    """What a straightforward cleanup does: one queryset delete per table, one transaction."""
    from django.db import transaction
    from django_celery_results.models import TaskResult

    from jobs.models import Job

    started = time.perf_counter()
    with transaction.atomic():
        Job.objects.filter(created_at__lt=now).delete()
        TaskResult.objects.filter(date_done__lt=now).delete()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
