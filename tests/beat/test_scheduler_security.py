"""Beat's runs carry masked kwargs for Celery's logs and TaskResult (jobs/beat/scheduler.py)."""

from __future__ import annotations

import json
import uuid

import pytest
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from django_celery_beat.schedulers import ModelEntry
from kombu import Exchange, Queue

from jobs.beat.scheduler import JobsiteScheduler
from jobsite.celery import app as celery_app

pytestmark = pytest.mark.broker

SECRET = "Tr0ub4dor-3-horse"


def first_message_beat_sends(task: str, kwargs: dict, *, then_send: str | None = None):
    """The first message on a probe route after beat applied a schedule of ``task``.

    With ``then_send``, that task is sent on the same route right after: it comes first
    when beat sent nothing.
    """
    queue = f"probe-{uuid.uuid4().hex[:8]}"
    schedule = PeriodicTask.objects.create(
        name=f"probe {queue}", task=task, kwargs=json.dumps(kwargs),
        interval=IntervalSchedule.objects.create(every=1, period="days"),
        queue=queue, exchange="jobsite-probe", routing_key=queue,
    )  # fmt: skip
    binding = Queue(queue, Exchange("jobsite-probe", type="direct"), routing_key=queue)
    scheduler = JobsiteScheduler(app=celery_app, lazy=True)
    with celery_app.connection_for_write() as conn:
        with conn.SimpleQueue(binding) as raw:
            with celery_app.producer_or_acquire() as producer:
                scheduler.apply_entry(ModelEntry(schedule, app=celery_app), producer=producer)
            if then_send:
                celery_app.send_task(then_send, exchange="jobsite-probe", routing_key=queue)
            message = raw.get(block=True, timeout=15)
            message.ack()
        binding(conn.default_channel).delete()
    return message


@pytest.mark.django_db
def test_beat_sends_a_secret_parameter_masked_in_kwargsrepr(job_types):
    message = first_message_beat_sends(
        "jobs.rotate_credentials", {"service": "billing-db", "new_password": SECRET}
    )

    assert message.headers["task"] == "jobs.rotate_credentials"
    assert "billing-db" in message.headers["kwargsrepr"]
    assert SECRET not in message.headers["kwargsrepr"]
    assert message.decode()[1] == {"service": "billing-db", "new_password": SECRET}  # the job's


@pytest.mark.django_db
def test_beat_does_not_send_a_schedule_of_an_internal_job_type(job_types, caplog):
    """A row written straight into the table (the admin refuses it) is logged, not sent."""
    message = first_message_beat_sends(
        "jobs.workflow_failed", {"workflow_id": "someone-elses"}, then_send="jobsite.relay"
    )

    assert message.headers["task"] == "jobsite.relay"
    assert "is internal: only Jobsite sends it" in caplog.text
