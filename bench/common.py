"""Shared benchmark plumbing: environment, Django set-up, a worker subprocess, tables.

Every benchmark runs against real services (PostgreSQL, Redis, RabbitMQ on loopback)
and its own database, never a test database:

    createdb -h 127.0.0.1 -U postgres bench_jobsite
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_jobsite .venv/bin/python manage.py migrate

Override the defaults with BENCH_DATABASE_URL, BENCH_REDIS_URL, BENCH_RABBITMQ_URL and
BENCH_JOBSITE_REDIS_URL (Jobsite's markers and locks).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/bench_jobsite"
)
BROKERS = {
    "redis": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
    "rabbitmq": os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}
JOBSITE_REDIS_URL = os.environ.get("BENCH_JOBSITE_REDIS_URL", "redis://127.0.0.1:6379/13")
SECRET_KEY = "bench-only-" + "x" * 50
# Benchmarks publish to and consume from their own queue only: another worker on the
# same broker (a developer's, a test's) never takes their messages.
QUEUE = "bench"


def bench_env(broker_url: str | None = None) -> dict[str, str]:
    """The environment of every process a benchmark starts (production settings)."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        # Benchmarks submit as fast as they can: no per-user submit rate in the way.
        "JOBSITE_SUBMIT_RATE": "1000000/s",
        "DATABASE_URL": DATABASE_URL,
        "CELERY_BROKER_URL": broker_url or BROKERS["redis"],
        "JOBSITE_REDIS_URL": JOBSITE_REDIS_URL,
        "DJANGO_SECRET_KEY": SECRET_KEY,
        "DJANGO_DEBUG": "false",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        "DJANGO_SESSION_COOKIE_SECURE": "false",
        "DJANGO_CSRF_COOKIE_SECURE": "false",
        "DJANGO_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


def django_setup(broker_url: str | None = None) -> None:
    """Configure this process like a production web process, then django.setup()."""
    os.environ.update(bench_env(broker_url))
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from jobs import services

    services.jobtypes_sync()  # job types declared since the last migrate (the no-op one)


def use_broker(url: str) -> None:
    """Point this process's Celery app at another broker (after django_setup)."""
    from jobsite.celery import app

    os.environ["CELERY_BROKER_URL"] = url
    app.conf.broker_url = url
    app.conf.broker_write_url = None
    app.conf.broker_read_url = None
    app._pool = None
    app.amqp._producer_pool = None


def purge(queues: tuple[str, ...] = (QUEUE,)) -> None:
    from jobsite.celery import app

    with app.connection_for_write() as conn:
        for queue in queues:
            # A queue that does not exist yet is empty.
            with contextlib.suppress(Exception):
                conn.default_channel.queue_purge(queue)


def forget_noop_runs() -> None:
    """Delete the no-op runs earlier measurements stored, and their audit entries."""
    from jobs.models import AuditEntry, Job

    ids = Job.objects.filter(job_type__name="noop").values("id")
    AuditEntry.objects.filter(target_type="run", target_id__in=ids).delete()
    Job.objects.filter(job_type__name="noop").delete()


def queue_depth(queue: str = QUEUE) -> int:
    from jobs.selectors.broker import queue_depths

    depth = queue_depths((queue,))[0].messages
    return -1 if depth is None else depth


class Process:
    """A Jobsite process (worker, beat, gunicorn) in its own session, logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        self.argv, self.env, self.name = argv, env, name
        self.log = Path(tempfile.mkdtemp(prefix=f"jobsite-bench-{name}-")) / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self, ready_marker: str, timeout: float = 60) -> float:
        """Start and wait for ``ready_marker`` in the log; returns the monotonic ready time."""
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready_marker in self.log.read_text(errors="replace"):
                return time.monotonic()
            if self.process.poll() is not None:
                break
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.output()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def worker(broker_url: str, *, concurrency: int = 2, queues: str = QUEUE) -> Process:
    argv = [
        sys.executable, "-m", "celery", "-A", "jobsite", "worker", "--loglevel=INFO",
        "--pool=prefork", f"--concurrency={concurrency}", f"--queues={queues}",
        "--hostname=bench@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    return Process(argv, bench_env(broker_url), "worker")


# --- Figures ---------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = fraction * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(title: str, header: list[str], rows: list[list]) -> str:
    """A plain-text table (also valid Markdown), printed and returned."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    out = [f"\n### {title}\n", line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells[1:]]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    python = platform.python_version()
    return f"{platform.node()}: {os.cpu_count()} cores, Python {python}, load average {load}"
