"""Fixtures: users, the catalogue, real brokers and real Celery workers.

Services are the real ones (PostgreSQL, Redis, RabbitMQ on this machine). When one
is missing, tests that need it are skipped locally and FAIL under CI=true.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.contrib.auth.models import Group, User
from django.core.management.base import CommandError
from django.core.management.commands import flush
from django.db import OperationalError, connection

from jobs import services
from jobs.models import FINISHED_STATES, Job, JobType
from jobsite.celery import app as celery_app

ROOT = Path(__file__).resolve().parent.parent
BROKERS = {
    "redis": os.environ["TEST_REDIS_URL"],
    "rabbitmq": os.environ["TEST_RABBITMQ_URL"],
}
WORKER_QUEUES = "default,reports,cpu"


def service_unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(reason)


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    default_port = {"redis": 6379, "amqp": 5672, "postgres": 5432}.get(parts.scheme, 0)
    try:
        with socket.create_connection((parts.hostname, parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


# --- Users and the catalogue ------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _flush_survives_a_deadlock() -> Iterator[None]:
    """Retry the between-tests flush when PostgreSQL picks it as a deadlock victim.

    A live worker may still be finishing a test's last message while the flush
    TRUNCATEs every table; PostgreSQL then aborts one of the two transactions.
    The flush rolls back whole, so running it again is safe.
    """
    original = flush.Command.handle

    def handle(self, *args, **options):
        for attempt in range(3):
            try:
                return original(self, *args, **options)
            except CommandError as exc:
                deadlock = isinstance(exc.__cause__, OperationalError) and (
                    "deadlock" in str(exc.__cause__)
                )
                if not deadlock or attempt == 2:
                    raise
                time.sleep(0.2)

    flush.Command.handle = handle
    yield
    flush.Command.handle = original


@pytest.fixture
def job_types(db) -> dict[str, JobType]:
    """The catalogue synced to the table (transactional tests flush it between tests)."""
    services.jobtypes_sync()
    return {jt.name: jt for jt in JobType.objects.all()}


@pytest.fixture
def submitters(db) -> Group:
    return Group.objects.create(name="submitters")


@pytest.fixture
def alice(db, submitters) -> User:
    user = User.objects.create_user("alice", password="alice-pass")
    user.groups.add(submitters)
    return user


@pytest.fixture
def bob(db, submitters) -> User:
    user = User.objects.create_user("bob", password="bob-pass")
    user.groups.add(submitters)
    return user


@pytest.fixture
def admin_user(db) -> User:
    return User.objects.create_superuser("root", "root@example.com", "root-pass")


@pytest.fixture
def granted(job_types, submitters) -> dict[str, JobType]:
    """Every demo job type runnable by the `submitters` group."""
    for job_type in job_types.values():
        job_type.allowed_groups.add(submitters)
    return job_types


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


# --- Brokers and workers ----------------------------------------------------------


class Worker:
    """A real `celery worker` subprocess (prefork) against a real broker and the test DB."""

    def __init__(
        self,
        broker: str,
        url: str,
        db_url: str,
        name: str = "",
        extra_env: dict | None = None,
        queues: str = WORKER_QUEUES,
        pool: str = "prefork",
        concurrency: int = 2,
        args: tuple[str, ...] = (),
    ) -> None:
        self.queues = queues
        self.args = args  # more `celery worker` options, e.g. ("-E",)
        self.pool, self.concurrency = pool, concurrency
        self.broker = broker
        self.url = url
        self.name = name or f"test-{broker}"
        self.log = Path(tempfile.mkdtemp(prefix=f"jobsite-worker-{broker}-")) / "worker.log"
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": db_url,
            "CELERY_BROKER_URL": url,
            "DJANGO_EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend",
            "DJANGO_EMAIL_FILE_PATH": str(self.log.parent / "mail"),
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.process: subprocess.Popen | None = None

    @property
    def mail_dir(self) -> Path:
        return self.log.parent / "mail"

    def start(self, timeout: float = 60) -> None:
        argv = [
            sys.executable, "-m", "celery", "-A", "jobsite", "worker",
            "--loglevel=INFO", f"--pool={self.pool}", f"--concurrency={self.concurrency}",
            f"--hostname={self.name}@%h", "--without-gossip", "--without-mingle",
            f"--queues={self.queues}", *self.args,
        ]  # fmt: skip
        with self.log.open("wb") as out:
            # Its own session, so a test can kill the whole worker (main + pool children).
            self.process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"worker on {self.broker} did not start:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once, as a crashed machine would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def use_broker(url: str) -> None:
    """Point this process's Celery app (the web side) at another broker."""
    # Celery reads CELERY_BROKER_URL from the environment before its own settings.
    os.environ["CELERY_BROKER_URL"] = url
    celery_app.conf.broker_url = url
    celery_app.conf.broker_write_url = None
    celery_app.conf.broker_read_url = None
    # kombu keeps one pool per connection URL in a registry: drop our references only.
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


def purge(url: str) -> None:
    with celery_app.connection_for_write(url) as conn:
        for queue in WORKER_QUEUES.split(","):
            # A queue that does not exist yet has nothing to purge.
            with contextlib.suppress(Exception):
                conn.default_channel.queue_purge(queue)


@pytest.fixture(scope="session")
def _workers(django_db_setup, django_db_blocker) -> Iterator[dict[str, Worker]]:
    settings = connection.settings_dict
    db_url = (
        f"postgres://{settings['USER']}@{settings['HOST']}:{settings['PORT']}/{settings['NAME']}"
    )
    workers: dict[str, Worker] = {}

    def get(broker: str) -> Worker:
        if broker not in workers:
            url = BROKERS[broker]
            purge(url)
            worker = Worker(broker, url, db_url)
            worker.start()
            workers[broker] = worker
        return workers[broker]

    get.db_url = db_url  # type: ignore[attr-defined]
    yield get  # type: ignore[misc]
    for worker in workers.values():
        worker.stop()


@pytest.fixture(params=["redis", "rabbitmq"])
def worker(request, _workers, transactional_db) -> Iterator[Worker]:
    """A running worker on each real broker; the test runs once per broker."""
    url = BROKERS[request.param]
    if not _reachable(url):
        service_unavailable(f"{request.param} is not reachable at {url}")
    w = _workers(request.param)
    if w.process.poll() is not None:
        pytest.fail(f"the {request.param} worker died:\n{w.output()}")
    use_broker(url)
    yield w
    use_broker(BROKERS["redis"])


def wait_for(job_id: str, *, states=FINISHED_STATES, timeout: float = 30) -> Job:
    """Poll the database until the run reaches one of ``states``."""
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = Job.objects.filter(pk=job_id).first()
        if job is not None and job.state in states:
            return job
        time.sleep(0.1)
    state = job.state if job else "no Job row"
    raise AssertionError(f"run {job_id} did not reach {sorted(states)} in {timeout}s: {state}")
