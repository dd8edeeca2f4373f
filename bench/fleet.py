"""Pages that talk to workers, with a fleet: 10 live workers and one killed with SIGKILL.

    .venv/bin/python -m bench.fleet --workers 10 --requests 20 --before /work/main

Starts ``--workers`` real workers (solo pool, each its own node name, on the benchmark's
own queue) and one more that is SIGKILLed once it has sent its heartbeat: a name the
heartbeats still list that no longer answers. Its heartbeat is renewed before each page
is measured, so every figure is taken in that worst case (the first INCARNATION_TTL
seconds after a worker died, or a host cut off), not after its name has aged out.

Then times, in-process with Django's test Client (the server's time), median and p95 of
``--requests`` requests after a warm-up: the workers page uncached (the cache cleared
before each request) and cached, the dashboard with its workers fragment, the admin
index and /metrics. ``--before ROOT`` measures the same pages with the code of another
checkout (e.g. main's worktree) against the same workers, in a subprocess, for the
"before" column.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from bench import common

GOALS = {  # p95, ms (issue 22, item 3)
    "workers page, uncached": 1200,
    "workers page, cached": 300,
    "admin index, uncached": 100,
    "admin index, cached": 100,
    "/metrics, uncached": 100,
    "/metrics, cached": 100,
}
# label, url, cache cleared before each request ("uncached": what a scrape every 15 s or
# the first page after 5 quiet seconds finds, as the aggregates are cached for 5 s).
PAGES = [
    ("workers page, uncached", "/workers/", True),
    ("workers page, cached", "/workers/", False),
    ("dashboard", "/", True),
    ("dashboard workers fragment, uncached", "/dashboard/system/", True),
    ("admin index, uncached", "/admin/", True),
    ("admin index, cached", "/admin/", False),
    ("/metrics, uncached", "/metrics", True),
    ("/metrics, cached", "/metrics", False),
]
DEAD = "fleet-dead@bench"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--before", metavar="ROOT", help="a checkout to measure as 'before'")
    parser.add_argument("--measure", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.requests)), flush=True)
        return {}
    print(common.machine(), flush=True)
    fleet = start_fleet(args.workers)
    try:
        after = _measure_in_subprocess(str(common.ROOT), args.requests)
        before = _measure_in_subprocess(args.before, args.requests) if args.before else {}
    finally:
        for process in fleet:
            process.stop()
    rows = []
    for label, _, _ in PAGES:
        was = before.get(label, [float("nan")] * 2)
        now = after[label]
        goal = GOALS.get(label)
        met = "-" if goal is None else ("yes" if now[1] <= goal else "NO")
        rows.append([label, was[0], was[1], now[0], now[1], goal or "-", met])
    common.table(
        f"Pages with {args.workers} workers and one killed (ms, server time; "
        "before = --before's code, after = this checkout's)",
        ["page", "before p50", "before p95", "after p50", "after p95", "goal p95", "met"],
        rows,
    )
    return {"before": before, "after": after}


# --- The fleet -------------------------------------------------------------------------


def _worker(name: str) -> common.Process:
    argv = [
        sys.executable, "-m", "celery", "-A", "jobsite", "worker", "--loglevel=INFO",
        "--pool=solo", f"--queues={common.QUEUE}", f"--hostname={name}",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    return common.Process(argv, common.bench_env(), name.split("@")[0])


def start_fleet(count: int) -> list[common.Process]:
    """``count`` live workers, and one started and SIGKILLed (its name stays heard)."""
    fleet = [_worker(f"fleet-{i}@bench") for i in range(count)]
    dead = _worker(DEAD)
    started = time.perf_counter()
    try:
        for process in [*fleet, dead]:
            process.start("ready.", timeout=120)
    except BaseException:
        for process in [*fleet, dead]:
            process.stop()
        raise
    os.killpg(dead.pid, signal.SIGKILL)
    dead.process.wait()  # type: ignore[union-attr]
    print(f"{count} workers ready and {DEAD} killed in {time.perf_counter() - started:.1f} s",
          flush=True)  # fmt: skip
    return fleet


def _measure_in_subprocess(root: str, requests: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--measure", root, "--requests", str(requests)],
        cwd=common.ROOT, env=common.bench_env(), capture_output=True, text=True, check=False,
        timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"measuring {root} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- Measuring (in a process of its own, with the code of ``root``) -----------------------


def measure(root: str, requests: int) -> dict[str, list[float]]:
    os.environ.update(common.bench_env())
    sys.path.insert(0, os.path.abspath(root))  # jobs/ and jobsite/ of that checkout
    import django

    django.setup()
    import jobs

    if not jobs.__file__ or not jobs.__file__.startswith(os.path.abspath(root)):
        raise RuntimeError(f"jobs imported from {jobs.__file__}, not from {root}")
    from django.contrib.auth.models import User

    from bench.history import Timer
    from jobs import heartbeat

    admin = User.objects.filter(username="fleet-admin").first()
    if admin is None:
        admin = User.objects.create_superuser("fleet-admin", "fleet@example.com", "x")
    timer = Timer(requests)
    figures = {}
    for label, url, uncached in PAGES:
        heartbeat.worker_seen_now(DEAD)  # the dead name stays among the heard ones
        p50, p95 = timer.time(admin, url, uncached=uncached)
        figures[label] = [p50, p95]
    if hasattr(heartbeat, "worker_gone"):  # so that nothing after the bench waits for it
        heartbeat.worker_gone(DEAD)
    return figures


if __name__ == "__main__":
    main()
