"""Submit → run → see, with a real worker on real Redis and on real RabbitMQ."""

import time

import pytest
from django.urls import reverse

from jobs.models import Job, JobLog
from jobs.tasks.demo import count_primes
from tests.conftest import wait_for

pytestmark = pytest.mark.broker

OPTIONS = {"opt-priority": "5", "opt-max_retries": "0"}


def submit(client, name: str, data: dict) -> Job:
    response = client.post(reverse("jobs-submit", args=[name]), {**OPTIONS, **data})
    assert response.status_code == 302, response.content.decode()[:2000]
    return Job.objects.get(pk=response["Location"].rstrip("/").rsplit("/", 1)[-1])


def test_a_submitted_job_runs_to_success_with_its_result(worker, alice_client, granted):
    job = submit(alice_client, "count_primes", {"limit": "100000", "opt-queue": "cpu"})

    job = wait_for(job.id)
    time.sleep(0.5)  # RECEIVED is written in batches by the worker's main process
    job.refresh_from_db()

    assert job.state == "SUCCESS"
    assert job.result == {"limit": 100000, "primes": 9592}
    assert job.sent_at and job.received_at and job.started_at and job.finished_at
    # (sent_at is stamped after the publish returns: a fast worker may start first)
    assert job.created_at <= job.started_at <= job.finished_at
    assert job.worker.startswith(f"test-{worker.broker}@")
    assert job.progress_current == job.progress_total == 1
    page = alice_client.get(job.get_absolute_url()).content.decode()
    assert "9592" in page and "Succeeded" in page


def test_a_failing_job_records_the_exception_and_traceback(worker, alice_client, granted):
    job = submit(
        alice_client,
        "flaky",
        {"mode": "fail", "failures": "0", "message": "<b>disk full</b>", "opt-queue": "default"},
    )

    job = wait_for(job.id)

    assert job.state == "FAILURE"
    assert job.exception_type == "SimulatedFailure"
    assert job.error_message == "<b>disk full</b>"
    assert "raise SimulatedFailure(message)" in job.traceback
    page = alice_client.get(job.get_absolute_url()).content.decode()
    assert "&lt;b&gt;disk full&lt;/b&gt;" in page  # shown escaped
    assert "<b>disk full</b>" not in page


def test_a_job_retries_then_succeeds_and_keeps_its_retry_history(worker, alice_client, granted):
    job = submit(
        alice_client,
        "flaky",
        {
            "mode": "retry",
            "failures": "2",
            "message": "flaky",
            "opt-queue": "default",
            "opt-max_retries": "3",
        },
    )

    job = wait_for(job.id, timeout=40)

    assert job.state == "SUCCESS"
    assert job.result == {"attempts": 3}
    assert job.retries == 2
    assert [r["attempt"] for r in job.retry_history] == [1, 2]
    assert "flaky (attempt 1)" in job.retry_history[0]["reason"]
    assert all(r["next_attempt_at"] for r in job.retry_history)
    messages = list(JobLog.objects.filter(job=job).values_list("message", flat=True))
    assert "Failing attempt 1 of 2 on purpose" in messages


def test_a_job_that_exhausts_its_retries_fails(worker, alice_client, granted):
    job = submit(
        alice_client,
        "flaky",
        {
            "mode": "retry",
            "failures": "5",
            "message": "still down",
            "opt-queue": "default",
            "opt-max_retries": "1",
        },
    )

    job = wait_for(job.id, timeout=40)

    assert job.state == "FAILURE"
    assert job.retries == 1
    assert "still down" in job.error_message


def test_progress_is_visible_while_the_job_runs(worker, alice_client, granted):
    job = submit(
        alice_client,
        "generate_report",
        {
            "title": "T",
            "region": "emea",
            "days": "20",
            "rows_per_day": "10",
            "pace_ms": "150",
            "opt-queue": "reports",
        },
    )

    running = wait_for(job.id, states={"PROGRESS"})
    live = alice_client.get(job.get_absolute_url(), headers={"HX-Request": "true"})
    done = wait_for(job.id)

    assert 0 < running.progress_current < running.progress_total == 20
    assert 'id="run-progress"' in live.content.decode()
    assert 'hx-trigger="every 1s"' in live.content.decode()  # keeps polling while running
    assert done.state == "SUCCESS"
    assert done.result["rows"] == 200
    final = alice_client.get(job.get_absolute_url(), headers={"HX-Request": "true"})
    assert "hx-trigger" not in final.content.decode()  # stops polling when finished
    download = alice_client.get(reverse("jobs-download", args=[job.id]))
    assert download.status_code == 200
    content = b"".join(download.streaming_content).decode()
    assert content.startswith("date,region,order,amount")
    assert len(content.strip().splitlines()) == 201


def test_a_run_sent_by_plain_delay_appears_in_history(worker, admin_user, client, job_types):
    result = count_primes.delay(limit=50)

    job = wait_for(result.id)

    assert job.source == "external"
    assert job.job_type == job_types["count_primes"]
    assert job.params == {"limit": 50}
    assert job.result == {"limit": 50, "primes": 15}
    client.force_login(admin_user)
    assert result.id[:13] in client.get(reverse("jobs-history")).content.decode()


def test_the_mail_job_sends_through_djangos_mail_backend(worker, alice_client, granted):
    job = submit(
        alice_client,
        "send_mail",
        {"to": "ops@example.com", "subject": "Nightly", "body": "All good", "opt-queue": "default"},
    )

    job = wait_for(job.id)

    assert job.state == "SUCCESS"
    deadline = time.monotonic() + 5
    while not list(worker.mail_dir.glob("*.log")) and time.monotonic() < deadline:
        time.sleep(0.1)
    sent = "".join(p.read_text() for p in worker.mail_dir.glob("*.log"))
    assert "To: ops@example.com" in sent and "Subject: Nightly" in sent
