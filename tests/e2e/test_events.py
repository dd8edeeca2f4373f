"""A worker that is not Jobsite's, seen through its task events (manage.py record_events).

The foreign side is a plain Celery app written here — its own tasks, Celery's default
settings but the broker URL, started with ``celery worker -E`` — and a plain client of
that app sends its tasks. Jobsite knows nothing of it but the broker. The recorder runs
as its own process (``manage.py record_events``), as in production; the test reads the
history it writes.

Also: the recorder killed (SIGKILL) and restarted mid-stream loses no run on RabbitMQ
(its queue is durable and events are acknowledged after they are stored); on Redis
events are published, not kept, so the test checks only that a restarted recorder
records again (README, *Runs of other workers*).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from django.urls import reverse
from kombu import Connection

from jobs.events.recorder import QUEUE_NAME
from jobs.models import Job, JobSource, JobState
from jobsite.celery import app as jobsite_app
from tests.conftest import BROKERS, ROOT, _reachable, service_unavailable, use_broker

pytestmark = [pytest.mark.broker]

FOREIGN_APP = textwrap.dedent(
    """
    import os
    import time

    from celery import Celery

    app = Celery("billing", broker=os.environ["FOREIGN_BROKER_URL"])
    app.conf.task_default_queue = os.environ["FOREIGN_QUEUE"]
    # shared=False: the test process imports this app too, and Celery would hand shared
    # tasks to every app created after it (other tests' apps) under the same names.

    @app.task(shared=False)
    def add(x, y):
        return x + y

    @app.task(shared=False)
    def boom(message):
        raise ValueError(message)

    @app.task(bind=True, max_retries=2, shared=False)
    def flaky(self, marker):
        if self.request.retries == 0:
            raise self.retry(countdown=0, exc=RuntimeError("first try fails: " + marker))
        return "ok after retry"

    @app.task(shared=False)
    def slow(seconds):
        time.sleep(seconds)
    """
)


class Process:
    def __init__(self, argv: list[str], env: dict, cwd: Path, ready: str) -> None:
        self.argv, self.env, self.cwd, self.ready = argv, env, cwd, ready
        self.log = Path(tempfile.mkdtemp(prefix="jobsite-events-")) / "out.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        start = self.log.stat().st_size
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log.open("rb") as f:
                f.seek(max(0, start - 1))
                if self.ready.encode() in f.read():
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.argv} did not start:\n{self.output()}")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(params=["redis", "rabbitmq"])
def foreign(request, _workers, transactional_db, tmp_path):
    """A foreign worker (own app, -E) and the recorder, on one real broker."""
    broker = request.param
    url = BROKERS[broker]
    if not _reachable(url):
        service_unavailable(f"{broker} is not reachable at {url}")
    queue = f"billing-{uuid.uuid4().hex[:8]}"
    (tmp_path / "billing.py").write_text(FOREIGN_APP)
    # Celery reads CELERY_BROKER_URL before an app's own broker (the client here too).
    env = {
        **os.environ, "FOREIGN_BROKER_URL": url, "FOREIGN_QUEUE": queue,
        "CELERY_BROKER_URL": url, "PYTHONPATH": str(tmp_path), "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    env.pop("DJANGO_SETTINGS_MODULE", None)
    worker = Process(
        [sys.executable, "-m", "celery", "-A", "billing", "worker", "-E", "--loglevel=INFO",
         "--concurrency=2", f"--hostname=billing-{broker}@%h", "--without-gossip",
         "--without-mingle", "-Q", queue],
        env, tmp_path, " ready.",
    )  # fmt: skip
    recorder_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
                    "DATABASE_URL": _workers.db_url, "CELERY_BROKER_URL": url,
                    "JOBSITE_EVENTS_FLUSH_MS": "100", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    recorder = Process([sys.executable, "manage.py", "record_events"], recorder_env, ROOT,
                       "Event recorder ready.")  # fmt: skip
    sys.path.insert(0, str(tmp_path))
    use_broker(url)
    os.environ["FOREIGN_BROKER_URL"], os.environ["FOREIGN_QUEUE"] = url, queue
    try:
        import billing  # the client: the same plain app, in this process

        # A new Celery app makes itself the current one: Jobsite's stays current here.
        jobsite_app.set_current()
        jobsite_app.set_default()

        recorder.start()
        worker.start()
        yield broker, billing, worker, recorder
    finally:
        worker.stop()
        recorder.stop()
        sys.modules.pop("billing", None)
        sys.path.remove(str(tmp_path))
        use_broker(BROKERS["redis"])
        with Connection(url) as conn, contextlib.suppress(Exception):
            conn.default_channel.queue_delete(queue)
            if broker == "rabbitmq":  # a durable queue outlives the test otherwise
                conn.default_channel.queue_delete(QUEUE_NAME)


def wait_rows(ids, states, timeout=60.0) -> dict[str, Job]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j.pk: j for j in Job.objects.filter(pk__in=list(ids), state__in=states)}
        if len(jobs) == len(ids) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.3)


def test_a_foreign_worker_s_runs_appear_in_history_with_their_states(foreign, admin_client):
    broker, billing, worker, recorder = foreign
    ok = billing.add.delay(2, 3)
    bad = billing.boom.delay("card declined")
    retried = billing.flaky.delay("m1")
    revoked_id = str(uuid.uuid4())
    billing.app.control.revoke(revoked_id)  # before it is sent: the worker discards it
    time.sleep(0.5)
    billing.slow.apply_async((30,), task_id=revoked_id)
    ids = [ok.id, bad.id, retried.id, revoked_id]
    final = (JobState.SUCCESS, JobState.FAILURE, JobState.REVOKED)
    jobs = wait_rows(ids, final)
    assert set(jobs) == set(ids), (worker.output(), recorder.output())

    done = jobs[ok.id]
    assert done.source == JobSource.EVENTS and done.job_type is None
    assert (done.state, done.task_name, done.result) == (JobState.SUCCESS, "billing.add", "5")
    assert done.worker.startswith(f"billing-{broker}@") and done.params == {"_args": [2, 3]}
    assert done.started_at and done.finished_at and done.executions == 1

    failed = jobs[bad.id]
    assert failed.state == JobState.FAILURE and failed.exception_type == "ValueError"
    assert failed.error_message == "card declined"
    assert "Traceback" in failed.traceback and "raise ValueError(message)" in failed.traceback

    again = jobs[retried.id]
    assert again.state == JobState.SUCCESS and again.retries == 1
    assert again.result == "'ok after retry'" and again.executions == 2
    assert again.error_message == "" and again.traceback == ""  # the retry's is not kept

    assert jobs[revoked_id].state == JobState.REVOKED

    # The history and the run page show them as the other runs (an operator sees all).
    page = admin_client.get(reverse("jobs-history"), {"task": "billing.boom", "source": "events"})
    assert page.status_code == 200 and bad.id in page.content.decode()
    detail = admin_client.get(reverse("jobs-detail", args=[bad.id])).content.decode()
    assert "Seen through events" in detail and "card declined" in detail
    assert "Retry" not in detail.split('id="run-actions"')[-1].split("</div>")[0]


def test_the_workers_page_shows_jobsite_s_and_the_other_worker_every_time(foreign, _workers):
    """A broadcast that counted only Jobsite's heartbeats took the first replies: the
    other codebase's worker pushed Jobsite's own off the page, one poll in two."""
    from jobs import heartbeat
    from jobs.selectors.workers import workers_inspect

    broker, _billing, _worker, _recorder = foreign
    jobsite_worker = _workers(broker)
    deadline = time.monotonic() + 20
    while not any(n.startswith(f"billing-{broker}@") for n in heartbeat.workers_expected()):
        assert time.monotonic() < deadline, "the recorder did not share the worker it heard"
        time.sleep(0.5)
    for _ in range(4):
        names = [w.name for w in workers_inspect()]
        assert any(n.startswith(f"billing-{broker}@") for n in names), names
        assert any(n.startswith(f"{jobsite_worker.name}@") for n in names), names


def test_the_recorder_killed_mid_stream_loses_no_run(foreign):
    broker, billing, _worker, recorder = foreign
    total = 600 if broker == "rabbitmq" else 200
    ids = [billing.add.delay(i, i).id for i in range(total // 2)]
    deadline = time.monotonic() + 60
    while Job.objects.filter(pk__in=ids).count() < total // 8:
        assert time.monotonic() < deadline, recorder.output()
        time.sleep(0.05)
    recorder.kill()  # mid-stream: batches in hand, events not yet acknowledged
    ids += [billing.add.delay(i, i).id for i in range(total // 2, total)]
    time.sleep(2)
    recorder.start()
    if broker == "rabbitmq":
        jobs = wait_rows(ids, [JobState.SUCCESS], timeout=90)
        missing = sorted(set(ids) - set(jobs))
        assert not missing, (len(missing), recorder.output())
        assert all(jobs[i].result == str(2 * n) for n, i in enumerate(ids))
        with Connection(BROKERS[broker]) as conn:
            _, waiting, _ = conn.default_channel.queue_declare(QUEUE_NAME, passive=True)
        assert waiting == 0  # every event acknowledged once stored
    else:
        # Redis: events published while it was down are gone; new ones are recorded.
        after = [billing.add.delay(1, 1).id for _ in range(20)]
        jobs = wait_rows(after, [JobState.SUCCESS], timeout=60)
        assert len(jobs) == len(after), recorder.output()


def test_a_foreign_worker_s_own_task_gets_its_rate_limit(foreign, admin_client):
    """The workers page offers each worker the tasks it reports (another codebase's:
    its own), and Celery's own inspection shows the change on that worker."""
    import socket

    from jobs import heartbeat
    from jobs.selectors.workers import workers_forget

    broker, billing, _worker, _recorder = foreign
    node = f"billing-{broker}@{socket.gethostname()}"
    deadline = time.monotonic() + 20
    while node not in heartbeat.workers_expected():
        assert time.monotonic() < deadline, "the recorder did not share the worker it heard"
        time.sleep(0.5)
    workers_forget()
    page = admin_client.get(reverse("jobs-workers")).content.decode()
    assert '<option value="billing.add">' in page
    done = admin_client.post(
        reverse("jobs-worker-control", args=["rate_limit"]),
        {"worker": node, "task_name": "billing.add", "rate_limit": "5/m"},
        follow=True,
    ).content.decode()
    assert "Rate limit changed" in done, done[-3000:]
    listed = billing.app.control.inspect(destination=[node], timeout=3).registered("rate_limit")
    assert "billing.add [rate_limit=5/m]" in listed[node]
    refused = admin_client.post(
        reverse("jobs-worker-control", args=["rate_limit"]),
        {"worker": node, "task_name": "billing.nope", "rate_limit": "5/m"},
    )
    assert refused.status_code == 400  # not a task that worker has: nothing sent


def test_waiting_runs_of_a_foreign_task_are_cancelled_by_its_name(foreign, admin_client):
    _broker, billing, _worker, _recorder = foreign
    held = billing.slow.apply_async((30,), countdown=120)  # the worker holds it (ETA)
    assert wait_rows([held.id], [JobState.RECEIVED]), "the recorder did not see it received"
    page = admin_client.get(reverse("jobs-revoke-by-name")).content.decode()
    assert '<option value="billing.slow">' in page  # offered: unfinished runs of it exist
    admin_client.post(reverse("jobs-revoke-by-name"), {"task_name": "billing.slow"})
    assert Job.objects.get(pk=held.id).state == JobState.REVOKED
    node = Job.objects.get(pk=held.id).worker
    revoked = billing.app.control.inspect(destination=[node], timeout=3).revoked()
    assert held.id in revoked[node]  # the other codebase's worker will not run it
