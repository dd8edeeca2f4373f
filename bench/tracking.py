"""What Jobsite's run tracking costs, against raw Celery, on a real worker.

    .venv/bin/python -m bench.tracking --broker both --jobs 20000

For each broker: publish N no-op messages with the worker stopped, start one worker
(prefork, concurrency 2, on the benchmark's own queue `bench`), and time the drain
from "worker ready" to the last job finished.

- Jobsite: N `services.job_submit` of the catalogued `noop` job type (Job row,
  audit entry, publish, RECEIVED/STARTED/SUCCESS recorded, result stored); finished
  means every Job row is SUCCESS (the end is the newest finished_at). `noop` is
  `acks_late`: each message is acknowledged only once its run's final state is
  durable (group-committed by the worker's main process, jobs.worker.commit, unless
  JOBSITE_GROUP_COMMIT=0).
- Raw Celery: N `apply_async(ignore_result=True)` of `jobsite.bench_noop`, a plain task
  that only INCRs a Redis counter; finished means the counter reached N.

The submit side (publishing rate) is reported too. Same broker, worker, machine and
database in the same run; the figures are jobs per second and their ratio.

On a shared machine one drain can be 20 % off the next: ``--rounds N`` measures each
broker N times, Jobsite then raw Celery each round, and adds the median of each column.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import common


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1, help="measurements per broker")
    args = parser.parse_args(argv)
    common.django_setup()
    print(common.machine(), flush=True)
    _explain_db_reuse()
    brokers = ["redis", "rabbitmq"] if args.broker == "both" else [args.broker]
    results = [measure(broker, args.jobs) for broker in brokers for _ in range(args.rounds)]
    rows = []
    for broker in brokers:
        mine = [r for r in results if r["broker"] == broker]
        for side, key in (("submit (publish side)", "submit"), ("drain (worker side)", "drain")):
            pairs = [(r[f"jobsite_{key}"], r[f"raw_{key}"]) for r in mine]
            for number, (jobsite, raw) in enumerate(pairs, 1):
                label = f"{side}, round {number}" if args.rounds > 1 else side
                rows.append([broker, label, jobsite, raw, jobsite / raw])
            if args.rounds > 1:
                rows.append([broker, f"{side}, median", statistics.median(p[0] for p in pairs),
                             statistics.median(p[1] for p in pairs),
                             statistics.median(p[0] / p[1] for p in pairs)])  # fmt: skip
    common.table(
        f"Tracking overhead: {args.jobs:,} no-op jobs, prefork -c 2 (jobs/s)",
        ["broker", "side", "Jobsite", "raw Celery", "ratio"],
        rows,
    )
    return results


def _explain_db_reuse() -> None:
    from jobsite.celery import app

    # Celery's Django fix-up reads the literal name CELERY_DB_REUSE_MAX; unset, it
    # closes the database connection before and after every task.
    reuse = app.conf.get("CELERY_DB_REUSE_MAX")
    effect = (
        f"the worker keeps its database connection across up to {reuse} tasks"
        if reuse
        else "unset: the worker reconnects to the database for every task"
    )
    print(f"CELERY_DB_REUSE_MAX = {reuse!r} ({effect})", flush=True)
    from django.conf import settings

    mode = "on" if settings.JOBSITE_GROUP_COMMIT else "off (each pool process stores its own)"
    print(f"JOBSITE_GROUP_COMMIT: {mode}", flush=True)


def measure(broker: str, n: int) -> dict:
    url = common.BROKERS[broker]
    common.use_broker(url)
    common.purge()
    jobsite_submit, jobsite_drain = _jobsite(url, n)
    common.purge()
    raw_submit, raw_drain = _raw(url, n)
    return {
        "broker": broker, "jobs": n,
        "jobsite_submit": jobsite_submit, "jobsite_drain": jobsite_drain,
        "raw_submit": raw_submit, "raw_drain": raw_drain,
    }  # fmt: skip


def _jobsite(url: str, n: int) -> tuple[float, float]:
    from django.contrib.auth.models import User

    from jobs import services
    from jobs.models import Job, JobSource, JobState, JobType

    _forget_earlier_runs()
    user, _ = User.objects.get_or_create(
        username="bench", defaults={"is_superuser": True, "is_staff": True}
    )
    job_type = JobType.objects.get(name="noop")
    started = time.perf_counter()
    for _ in range(n):
        services.job_submit(
            job_type=job_type,
            params={},
            user=user,
            options={"queue": common.QUEUE},
            source=JobSource.API,
        )
    submit_rate = n / (time.perf_counter() - started)
    _check_queued(n)
    # Through the (job_type, created_at) index: the benchmark database may hold a million
    # other runs, and a poll that scans them would compete with the worker for the CPU.
    done = Job.objects.filter(job_type=job_type, state=JobState.SUCCESS)
    worker = common.worker(url)
    ready_wall = _start(worker)
    try:
        # The broker's count is cheap; the database is only asked once the queue is empty.
        _wait(lambda: common.queue_depth() == 0 and done.count() >= n, worker, poll=0.2)
    finally:
        worker.stop()
    last = max(done.values_list("finished_at", flat=True))
    return submit_rate, n / (last.timestamp() - ready_wall)


def _forget_earlier_runs() -> None:
    """Start every measurement from the same tables: no rows, no dead rows of earlier runs."""
    from django.db import connection
    from django_celery_results.models import TaskResult

    from jobs.models import AuditEntry, Job

    ids = Job.objects.filter(job_type__name="noop").values("id")
    TaskResult.objects.filter(task_id__in=ids).delete()
    AuditEntry.objects.filter(target_type="run", target_id__in=ids).delete()
    Job.objects.filter(job_type__name="noop").delete()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            for table in (Job, TaskResult, AuditEntry):
                cursor.execute(f'VACUUM ANALYZE "{table._meta.db_table}"')


def _raw(url: str, n: int) -> tuple[float, float]:
    from jobs import redis as jobsite_redis
    from jobs.tasks.benchmark import BENCH_COUNTER_KEY, bench_noop

    redis = jobsite_redis.client()
    redis.delete(BENCH_COUNTER_KEY)
    started = time.perf_counter()
    for _ in range(n):
        bench_noop.apply_async(ignore_result=True, queue=common.QUEUE)
    submit_rate = n / (time.perf_counter() - started)
    _check_queued(n)
    worker = common.worker(url)
    ready_wall = _start(worker)
    try:
        _wait(lambda: int(redis.get(BENCH_COUNTER_KEY) or 0) >= n, worker, poll=0.005)
        end_wall = time.time()
        _wait(lambda: common.queue_depth() == 0, worker, poll=0.05)
    finally:
        worker.stop()
    return submit_rate, n / (end_wall - ready_wall)


def _start(worker: common.Process) -> float:
    ready = worker.start(" ready.")
    # Wall clock at the ready line: Job.finished_at is wall-clock time.
    return time.time() - (time.monotonic() - ready)


def _check_queued(n: int, wait: float = 10.0) -> None:
    # RabbitMQ counts the last messages published a moment later: wait for them.
    deadline = time.monotonic() + wait
    while (depth := common.queue_depth()) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    if depth != n:
        raise RuntimeError(f"expected {n} queued messages, the broker holds {depth}")


def _wait(done, worker: common.Process, *, poll: float, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if worker.process.poll() is not None:
            raise RuntimeError(f"the worker died:\n{worker.output()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not drained after {timeout} s:\n{worker.output()}")
        time.sleep(poll)


if __name__ == "__main__":
    main()
