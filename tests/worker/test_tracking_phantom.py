"""Control commands about ids no worker has seen leave no phantom run in history."""

from __future__ import annotations

import socket
import uuid

import pytest
from celery import Celery
from django_celery_results.models import TaskResult
from kombu import Producer

from jobs.models import Job
from jobsite.celery import app as celery_app
from tests.conftest import wait_for

pytestmark = pytest.mark.broker


def revoke(worker, task_id: str) -> None:
    """`celery control revoke <id>`, waiting for the worker's reply (it has acted then)."""
    node = f"{worker.name}@{socket.gethostname()}"
    replies = celery_app.control.revoke(task_id, destination=[node], reply=True, timeout=10)
    assert replies == [{node: {"ok": f"tasks {{'{task_id}'}} flagged as revoked"}}], replies


def test_revoking_an_unknown_id_records_no_run(worker):
    unknown = str(uuid.uuid4())

    revoke(worker, unknown)

    # Celery marks it REVOKED in its result backend (its own record of the id) ...
    assert TaskResult.objects.get(task_id=unknown).status == "REVOKED"
    # ... but nothing says what would have run: no Job row, so no run in history.
    assert not Job.objects.filter(pk=unknown).exists()
    assert not Job.objects.filter(task_name="").exists()


def test_a_revoked_id_whose_message_arrives_later_is_recorded_with_its_task(worker, job_types):
    task_id = str(uuid.uuid4())
    revoke(worker, task_id)
    message = Celery("foreign", set_as_current=False).amqp.as_task_v2(
        task_id, "jobs.count_primes", kwargs={"limit": 5000}
    )

    with celery_app.connection_for_write() as conn:
        Producer(conn).publish(
            message.body, exchange="default", routing_key="default", serializer="json",
            headers=message.headers, **message.properties,
        )  # fmt: skip

    job = wait_for(task_id)
    assert job.state == "REVOKED"
    assert job.task_name == "jobs.count_primes"
    assert job.job_type == job_types["count_primes"]
