"""Reconciliation of stuck runs: held by a worker incarnation that is gone (issue 20).

Its worker's name may be heartbeating again (a supervisor restarted it), so the silent
worker rule never fires; the marker's holder incarnation tells.
"""

from __future__ import annotations

import uuid

import pytest
from django.utils import timezone

from jobs import heartbeat, markers, redis, services
from jobs.models import Job, JobLog, JobSource
from tests.conftest import wait_for
from tests.worker.test_task_incarnation import dead_pid


def stuck_run(granted, alice, *, holder_alive: bool, source=JobSource.FORM) -> Job:
    """STARTED on a worker whose name heartbeats, its marker held by some incarnation."""
    job = Job.objects.create(
        id=str(uuid.uuid4()), task_name="jobs.send_mail", submitted_by=alice, source=source,
        job_type=granted["send_mail"], state="STARTED", worker="w2@restarted",
        started_at=timezone.now(),
        params={"to": "ops@example.com", "subject": f"stuck-{uuid.uuid4()}", "body": "x"},
    )  # fmt: skip
    heartbeat.worker_seen_now("w2@restarted")  # the name is alive again
    instance = f"i{uuid.uuid4().hex[:6]}"
    pid = dead_pid()
    if holder_alive:
        redis.client().set(heartbeat.INCARNATION_KEY.format(instance), "elsewhere", ex=30)
    redis.client().set(markers.key(job.id), f"run|w2@restarted|{instance}|{pid}|t".encode())
    return job


def test_a_live_holder_is_left_alone(db, granted, alice):
    job = stuck_run(granted, alice, holder_alive=True)

    assert services.jobs_mark_lost() == 0
    assert Job.objects.get(pk=job.pk).state == "STARTED"
    assert redis.client().get(markers.key(job.id)).startswith(b"run|")


def test_a_workflow_step_held_by_a_gone_incarnation_is_marked_lost(db, granted, alice):
    job = stuck_run(granted, alice, holder_alive=False, source=JobSource.WORKFLOW)

    assert services.jobs_mark_lost() == 1
    job.refresh_from_db()
    assert job.state == "LOST"
    assert "is gone: w2@restarted" in job.error_message
    assert redis.client().get(markers.key(job.id)) is None
    assert services.jobs_mark_lost() == 0  # handled once


@pytest.mark.broker
def test_a_run_held_by_a_gone_incarnation_is_delivered_again_and_runs(worker, granted, alice):
    job = stuck_run(granted, alice, holder_alive=False)

    assert services.jobs_mark_lost() == 1
    job = wait_for(job.id)

    assert job.state == "SUCCESS"
    assert job.executions == 1
    sent = "".join(p.read_text() for p in worker.mail_dir.glob("*.log"))
    assert sent.count(job.params["subject"]) == 1
    assert JobLog.objects.filter(job=job, message__contains="delivered it again").exists()
    assert job.worker.startswith(worker.name)
