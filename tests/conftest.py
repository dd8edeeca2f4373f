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
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import kombu
import pytest
from django.contrib.auth.models import Group, Permission, User
from django.core.cache import cache
from django.core.management.base import CommandError
from django.core.management.commands import flush
from django.db import OperationalError, connection
from django.utils import timezone

from jobs import services
from jobs.models import FINISHED_STATES, Job, JobType
from jobs.selectors import stats
from jobsite.celery import app as celery_app

ROOT = Path(__file__).resolve().parent.parent
BROKERS = {
    "redis": os.environ["TEST_REDIS_URL"],
    "rabbitmq": os.environ["TEST_RABBITMQ_URL"],
}
WORKER_QUEUES = "default,reports,cpu"


# Fixtures that start a worker, a beat or a browser, or connect to a broker. A test that
# uses one must carry the `broker` marker, so `pytest -m "not broker"` is the fast loop
# (no process started, no broker needed) and the marking cannot drift.
BROKER_FIXTURES = frozenset({"worker", "_workers", "live_broker", "browser"})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    used = BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if used and item.get_closest_marker("broker") is None:
        pytest.fail(
            f"{item.nodeid} uses {', '.join(sorted(used))} but is not marked `broker`: "
            "add `pytestmark = pytest.mark.broker` to its module or "
            "`@pytest.mark.broker` to the test",
            pytrace=False,
        )


# kombu transports that need no broker: they live in the test process (or its files).
IN_PROCESS_TRANSPORTS = frozenset({"memory", "filesystem"})


@pytest.fixture(autouse=True)
def _no_broker_unless_marked(request, monkeypatch) -> None:
    """A test not marked `broker` that opens a broker connection fails, and says so.

    The fixture check above sees the fixtures a test asks for; this one sees what the code
    under test does (a remote-control ping, a revoke broadcast, a queue depth), so a test
    that needs the broker cannot slip into the fast loop (`-m "not broker"`) unmarked.
    """
    if request.node.get_closest_marker("broker") is not None:
        return
    establish = kombu.Connection._establish_connection

    def refuse(connection: kombu.Connection):
        if connection.transport_cls in IN_PROCESS_TRANSPORTS:
            return establish(connection)
        pytest.fail(
            f"{request.node.nodeid} connected to the broker {connection.as_uri()} "
            "but is not marked `broker`",
            pytrace=False,
        )

    monkeypatch.setattr(kombu.Connection, "_establish_connection", refuse)


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


@pytest.fixture
def alice_secret(alice) -> str:
    """An API token of Alice's (its secret)."""
    _, secret = services.api_token_create(user=alice, name="tests")
    return secret


# --- Runs made directly (no worker) -------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each test starts from an empty cache (the dashboard's aggregates are cached for
    a few seconds), so no test sees numbers a test before it cached. A ping the test
    started in the background ends before the cache is emptied."""
    cache.clear()
    yield
    stats.workers_refresh_wait()
    cache.clear()


@pytest.fixture
def operator(db) -> User:
    """A user who sees everyone's runs (view_all_jobs)."""
    user = User.objects.create_user("olga", password="olga-pass")
    user.user_permissions.add(Permission.objects.get(codename="view_all_jobs"))
    return user


def run(user, job_type, state, *, ago=60.0, wait=1.0, runtime=None, exc="", **fields) -> Job:
    """A run submitted ``ago`` seconds ago, started ``wait`` s later, ``runtime`` s long."""
    created = timezone.now() - timedelta(seconds=ago)
    started = created + timedelta(seconds=wait) if runtime is not None else None
    finished = started + timedelta(seconds=runtime) if started else None
    return Job.objects.create(
        id=str(uuid.uuid4()),
        job_type=job_type,
        task_name=job_type.task_name,
        submitted_by=user,
        state=state,
        created_at=created,
        started_at=started,
        finished_at=finished,
        exception_type=exc,
        error_message=f"{exc} happened" if exc else "",
        **fields,
    )


@pytest.fixture
def runs(alice, bob, job_types):
    """The dashboard's mix of runs (history and metrics tests have their own)."""
    flaky, primes = job_types["flaky"], job_types["count_primes"]
    made = [
        # alice: 3 succeeded, 2 failed (ValueError), 1 pending
        *(run(alice, primes, "SUCCESS", ago=120, runtime=r) for r in (1.0, 2.0, 3.0)),
        *(run(alice, flaky, "FAILURE", ago=300, runtime=0.5, exc="ValueError") for _ in "ab"),
        run(alice, flaky, "PENDING", ago=10),
        # bob: 1 succeeded 5 hours ago, 4 failed (KeyError), 1 started
        run(bob, primes, "SUCCESS", ago=5 * 3600, runtime=10.0),
        *(run(bob, flaky, "FAILURE", ago=200, runtime=0.2, exc="KeyError") for _ in "abcd"),
        run(bob, flaky, "STARTED", ago=30, wait=2, runtime=None),
        # finished three days ago: outside every window
        run(alice, primes, "SUCCESS", ago=3 * 86400, runtime=1.0),
    ]
    return made


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


@pytest.fixture
def live_broker() -> Callable[[str], str]:
    """``live_broker("redis" | "rabbitmq")``: that real broker's URL, once it answers.

    Every fixture or test that talks to a broker without a worker asks for this one, so
    the marker check (`pytest_runtest_setup` below) sees it needs the `broker` marker.
    """

    def url(name: str) -> str:
        url = BROKERS[name]
        if not _reachable(url):
            service_unavailable(f"{name} is not reachable at {url}")
        return url

    return url


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


@pytest.fixture
def redis_worker(_workers, transactional_db, live_broker) -> Worker:
    """The real worker on Redis only (the `worker` fixture would run every test twice)."""
    url = live_broker("redis")
    worker = _workers("redis")
    use_broker(url)
    return worker


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
