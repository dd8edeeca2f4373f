"""Single-submit throughput under 1, 4 and 20 concurrent clients, against raw apply_async.

    .venv/bin/python -m bench.concurrency --broker both --clients 1,4,20 --seconds 5

Each client is a process of its own (its own database connection and broker connection,
no shared GIL), started once and reused. For each broker and client count, for --seconds:

- Jobsite: ``services.job_submit`` of the catalogued no-op job type, one at a time (the
  form's and POST /api/runs/'s path without HTTP): permission check, Job row and audit
  entry in one transaction, publish after the commit, sent_at stored;
- raw Celery: ``apply_async(ignore_result=True)`` of ``jobsite.bench_noop``, which stores
  nothing.

No worker runs (the queue `bench` is purged after each phase); the figures are submits per
second summed over the clients, and Jobsite's ratio to raw Celery in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

from bench import common


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq", "both"], default="both")
    parser.add_argument("--clients", default="1,4,20", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.clients.split(",")]
    common.django_setup()
    print(common.machine(), flush=True)
    _jobsite_submit()  # the bench user, before the clients look it up at once
    brokers = ["redis", "rabbitmq"] if args.broker == "both" else [args.broker]
    results, rows = [], []
    for broker in brokers:
        url = common.BROKERS[broker]
        common.use_broker(url)
        common.purge()
        with Clients(max(counts), url) as clients:
            for n in counts:
                rates = {}
                for mode in ("jobsite", "raw"):
                    rates[mode] = clients.run(mode, n, args.seconds)
                    common.purge()
                results.append({"broker": broker, "clients": n, **rates})
                rows.append([broker, n, rates["jobsite"], rates["raw"],
                             rates["jobsite"] / rates["raw"]])  # fmt: skip
        common.forget_noop_runs()
    common.table(
        f"Single submits: concurrent client processes, {args.seconds:g} s each (submits/s)",
        ["broker", "clients", "Jobsite job_submit", "raw apply_async", "ratio"],
        rows,
    )
    return results


class Clients:
    """``size`` client processes (spawned: each sets Django up and connects on its own)."""

    def __init__(self, size: int, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in range(size)]
        self.processes = [
            context.Process(target=_client, args=(url, commands, self.results), daemon=True)
            for commands in self.commands
        ]

    def __enter__(self) -> Clients:
        for process in self.processes:
            process.start()
        for _ in self.processes:
            self._result()  # "ready": set up and warmed up
        return self

    def __exit__(self, *exc) -> None:
        for commands in self.commands:
            commands.put(None)
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()

    def run(self, mode: str, n: int, seconds: float) -> float:
        start_at = time.time() + 0.3
        for commands in self.commands[:n]:
            commands.put((mode, start_at, seconds))
        return sum(self._result() for _ in range(n)) / seconds

    def _result(self, timeout: float = 120):
        result = self.results.get(timeout=timeout)
        if isinstance(result, str):
            raise RuntimeError(f"a client failed: {result}")
        return result


def _client(url: str, commands, results) -> None:
    try:
        os.environ.update(common.bench_env(url))
        import django

        django.setup()  # the parent has synced the job types already
        submit = {"jobsite": _jobsite_submit(), "raw": _raw_submit()}
        for one in submit.values():
            one()  # connections opened, caches filled
        common.purge()
        results.put(0)
    except Exception as exc:  # reported to the parent, which stops
        results.put(repr(exc))
        return
    while (command := commands.get()) is not None:
        mode, start_at, seconds = command
        one = submit[mode]
        time.sleep(max(0.0, start_at - time.time()))
        deadline, done = start_at + seconds, 0
        try:
            while time.time() < deadline:
                one()
                done += 1
        except Exception as exc:
            results.put(repr(exc))
            continue
        results.put(done)


def _jobsite_submit():
    from django.contrib.auth.models import User

    from jobs import services
    from jobs.models import JobSource, JobType

    user, _ = User.objects.get_or_create(
        username="bench", defaults={"is_superuser": True, "is_staff": True}
    )
    job_type = JobType.objects.get(name="noop")
    options = {"queue": common.QUEUE}

    def submit() -> None:
        services.job_submit(job_type=job_type, params={}, user=user, options=options,
                            source=JobSource.API)  # fmt: skip

    return submit


def _raw_submit():
    from jobs.tasks.benchmark import bench_noop

    def submit() -> None:
        bench_noop.apply_async(ignore_result=True, queue=common.QUEUE)

    return submit


if __name__ == "__main__":
    main()
