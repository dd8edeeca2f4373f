"""The workers page's new controls against a real worker, checked with Celery's own CLI.

One worker of its own (Redis; --autoscale=3,1, -O fair) on a private queue, so what the
test changes (rate and time limits, autoscale bounds, held runs) touches no other test.
Pool restart is refused: Jobsite's settings leave CELERY_WORKER_POOL_RESTARTS off and
the worker helper cannot turn it on, so the test checks the refusal is shown as such.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import uuid

import pytest
from django.contrib.auth.models import Permission, User
from django.db import transaction
from django.urls import reverse

from jobs import services
from jobs.models import FINISHED_STATES, AuditAction, AuditEntry, AuditOutcome, Job
from jobsite.celery import app as celery_app
from tests.conftest import BROKERS, Worker, use_broker, wait_for
from tests.e2e.test_celery_cli import celery

pytestmark = pytest.mark.broker

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def own_worker(_workers, transactional_db, live_broker):
    url = live_broker("redis")
    queue = f"controls-{uuid.uuid4().hex[:8]}"
    worker = Worker(
        "redis", url, _workers.db_url, name=f"controls-{uuid.uuid4().hex[:6]}", queues=queue,
        concurrency=3, args=("--autoscale=3,1", "-O", "fair"),
    )  # fmt: skip
    use_broker(url)
    worker.start()
    worker.queue = queue  # type: ignore[attr-defined]
    worker.node = f"{worker.name}@{socket.gethostname()}"  # type: ignore[attr-defined]
    yield worker
    # A warm shutdown: the runs it holds (ETA) go back to its queue, which is then
    # deleted; killed, they would stay in Redis's unacknowledged hash, which other tests
    # count.
    worker.stop()
    with celery_app.connection_for_write(url) as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_delete(queue)
    use_broker(BROKERS["redis"])


@pytest.fixture
def operator_client(client, db):
    user = User.objects.create_user("opal", password="opal-pass")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["manage_workers", "control_jobs", "view_all_jobs"])
    )
    client.force_login(user)
    return client


def post(client, control: str, **data):
    response = client.post(reverse("jobs-worker-control", args=[control]), data, follow=True)
    assert response.status_code == 200, response.content.decode()
    return response.content.decode()


def call(worker, task: str, *options: str) -> str:
    sent = celery("call", task, "--queue", worker.queue, *options, env=worker.env)
    return UUID.findall(sent)[-1]


def scheduled_on(worker, run_ids: list[str], timeout: float = 10) -> bool:
    """Whether the worker holds these runs until their ETA, by `celery inspect scheduled`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = celery("inspect", "scheduled", "--destination", worker.node, env=worker.env)
        if all(run_id in listed for run_id in run_ids):
            return True
        time.sleep(0.3)
    return False


def test_the_new_controls_change_the_real_worker(own_worker, operator_client):
    worker, node = own_worker, own_worker.node
    target = ["--destination", node]

    # Time limits: the worker's task now has them, as Celery's own listing shows, and
    # the next run is cut off by them (Celery's own command alone leaves a prefork worker
    # on the limits it started with until its pool restarts: jobs.worker.control).
    page = post(operator_client, "time_limit", worker=node, task_name="jobs.long_sleep",
                soft=1, hard=3)  # fmt: skip
    assert "Time limits changed" in page
    listed = celery("inspect", "registered", "soft_time_limit", "time_limit", *target,
                    env=worker.env)  # fmt: skip
    assert "jobs.long_sleep [soft_time_limit=1 time_limit=3]" in listed
    cut = wait_for(call(worker, "jobs.long_sleep", "--kwargs", '{"seconds": 30}'), timeout=15)
    assert cut.state == "FAILURE" and "TimeLimitExceeded" in cut.exception_type, cut.exception_type

    # Rate limit: Celery lists it, and a second run waits while a later one of another
    # task runs.
    page = post(operator_client, "rate_limit", worker=node, task_name="jobs.noop",
                rate_limit="1/m")  # fmt: skip
    assert "Rate limit changed" in page
    listed = celery("inspect", "registered", "rate_limit", *target, env=worker.env)
    assert "jobs.noop [rate_limit=1/m]" in listed
    first, second = call(worker, "jobs.noop"), call(worker, "jobs.noop")
    assert wait_for(first).state == "SUCCESS"
    later = call(worker, "jobs.count_primes", "--kwargs", '{"limit": 100}')
    assert wait_for(later).state == "SUCCESS"  # sent after it, done before it
    assert not Job.objects.filter(pk=second, state__in=["STARTED", *FINISHED_STATES]).exists()

    # Autoscale: Celery's stats show the new bounds.
    page = post(operator_client, "autoscale", worker=node, maximum=2, minimum=1)
    assert "autoscale now max=2 min=1" in page
    stats = json.loads(celery("inspect", "stats", "--json", *target, env=worker.env))
    assert (stats[node]["autoscaler"]["max"], stats[node]["autoscaler"]["min"]) == (2, 1)

    # Pool restart: refused by Celery (worker_pool_restarts off), and the page says so.
    page = post(operator_client, "pool_restart", worker=node)
    assert f"{node} refused: Pool restarts not enabled" in page
    outcomes = dict(AuditEntry.objects.values_list("action", "outcome"))
    assert outcomes == {
        AuditAction.TIME_LIMIT: AuditOutcome.OK,
        AuditAction.RATE_LIMIT: AuditOutcome.OK,
        AuditAction.AUTOSCALE: AuditOutcome.OK,
        AuditAction.POOL_RESTART: AuditOutcome.FAILED,
    }


def test_cancel_by_name_revokes_the_held_runs_on_the_worker(
    own_worker, operator_client, admin_user, job_types
):
    worker = own_worker
    options = {"countdown": 60, "queue": worker.queue}
    with transaction.atomic():  # published on commit
        held = [
            services.job_submit(job_type=job_types["noop"], params={}, user=admin_user,
                                options=options).pk
            for _ in range(2)
        ]  # fmt: skip
    assert scheduled_on(worker, held)  # the worker holds them until their ETA

    response = operator_client.post(
        reverse("jobs-revoke-by-name"), {"task_name": "jobs.noop"}, follow=True
    )

    assert "jobs.noop: cancelled 2 waiting run(s)." in response.content.decode()
    revoked = celery("inspect", "revoked", "--destination", worker.node, env=worker.env)
    assert all(run_id in revoked for run_id in held), revoked
    assert all(wait_for(run_id).state == "REVOKED" for run_id in held)
