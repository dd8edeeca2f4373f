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


@pytest.mark.django_db
def test_beat_sends_a_secret_parameter_masked_in_kwargsrepr(job_types):
    queue = f"probe-{uuid.uuid4().hex[:8]}"
    schedule = PeriodicTask.objects.create(
        name="rotate nightly", task="jobs.rotate_credentials",
        kwargs=json.dumps({"service": "billing-db", "new_password": SECRET}),
        interval=IntervalSchedule.objects.create(every=1, period="days"),
        queue=queue, exchange="jobsite-probe", routing_key=queue,
    )  # fmt: skip
    binding = Queue(queue, Exchange("jobsite-probe", type="direct"), routing_key=queue)
    scheduler = JobsiteScheduler(app=celery_app, lazy=True)
    with celery_app.connection_for_write() as conn:
        with conn.SimpleQueue(binding) as raw:
            with celery_app.producer_or_acquire() as producer:
                scheduler.apply_entry(ModelEntry(schedule, app=celery_app), producer=producer)
            message = raw.get(block=True, timeout=15)
            message.ack()
        binding(conn.default_channel).delete()

    assert message.headers["task"] == "jobs.rotate_credentials"
    assert "billing-db" in message.headers["kwargsrepr"]
    assert SECRET not in message.headers["kwargsrepr"]
    assert message.decode()[1] == {"service": "billing-db", "new_password": SECRET}  # the job's


@pytest.mark.django_db
def test_beat_does_not_send_a_schedule_of_an_internal_job_type(job_types, caplog):
    """A row written straight into the table (the admin refuses it) is logged, not sent."""
    queue = f"probe-{uuid.uuid4().hex[:8]}"
    schedule = PeriodicTask.objects.create(
        name="errback by hand", task="jobs.workflow_failed",
        kwargs=json.dumps({"workflow_id": "someone-elses"}),
        interval=IntervalSchedule.objects.create(every=1, period="days"),
        queue=queue, exchange="jobsite-probe", routing_key=queue,
    )  # fmt: skip
    binding = Queue(queue, Exchange("jobsite-probe", type="direct"), routing_key=queue)
    scheduler = JobsiteScheduler(app=celery_app, lazy=True)
    with celery_app.connection_for_write() as conn:
        with conn.SimpleQueue(binding) as raw:
            with celery_app.producer_or_acquire() as producer:
                scheduler.apply_entry(ModelEntry(schedule, app=celery_app), producer=producer)
            # A run sent on the same route after it arrives first if nothing was sent.
            celery_app.send_task("jobsite.relay", exchange="jobsite-probe", routing_key=queue)
            message = raw.get(block=True, timeout=15)
            message.ack()
        binding(conn.default_channel).delete()

    assert message.headers["task"] == "jobsite.relay"
    assert "is internal: only Jobsite sends it" in caplog.text
