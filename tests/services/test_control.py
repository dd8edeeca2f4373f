"""Cancel, terminate, retry, rerun, bulk, pause/resume, roles and audit — on real brokers."""

import time
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.urls import reverse
from django.utils import timezone
from django_celery_results.models import TaskResult

from jobs import markers, services
from jobs.models import AuditEntry, Job, JobLog
from jobs.roles import setup_roles
from jobs.selectors import broker
from jobs.tasks.demo import send_mail
from tests.conftest import wait_for
from tests.worker.test_tracking import submit


@pytest.fixture
def roles(db):
    return setup_roles()


@pytest.fixture
def operator(roles):
    user = User.objects.create_user("olga", password="olga-pass")
    user.groups.add(roles["operator"])
    return user


@pytest.fixture
def viewer(roles):
    user = User.objects.create_user("vic", password="vic-pass")
    user.groups.add(roles["viewer"])
    return user


def action(client, job, name):
    return client.post(reverse("jobs-action", args=[job.id, name]))


def audited(job, action_name) -> bool:
    return AuditEntry.objects.filter(target_id=job.id, action=action_name).exists()


def mails(worker) -> str:
    return "".join(p.read_text() for p in worker.mail_dir.glob("*.log"))


def mail_in_3s(client, subject: str) -> Job:
    """A mail run due in 3 s: the worker holds its message until then."""
    data = {"to": "x@example.com", "subject": subject, "body": "b", "opt-queue": "default",
            "opt-countdown": "3"}  # fmt: skip
    return submit(client, "send_mail", data)


@pytest.mark.broker
def test_a_run_cancelled_after_delivery_never_executes(worker, alice_client, granted):
    subject = f"must-not-send-{uuid.uuid4()}"
    job = mail_in_3s(alice_client, subject)
    wait_for(job.id, states={"RECEIVED"})  # the worker holds the message until its ETA

    response = action(alice_client, job, "cancel")
    # A later run on the same queue, due after the cancelled one: once the worker has run
    # it, it has reached the cancelled run's ETA too.
    later_subject = f"sent-later-{uuid.uuid4()}"
    assert wait_for(mail_in_3s(alice_client, later_subject).id).state == "SUCCESS"

    job.refresh_from_db()
    assert response.status_code == 302
    assert job.state == "REVOKED"
    assert job.started_at is None
    assert later_subject in mails(worker)
    assert subject not in mails(worker)
    assert audited(job, "cancel")


@pytest.mark.broker
def test_a_cancel_marker_stops_a_worker_that_missed_the_revoke_broadcast(worker, alice, granted):
    # The marker alone (no broadcast): as for a worker that was down at cancel time.
    subject = f"marker-{uuid.uuid4()}"
    job_id = str(uuid.uuid4())
    Job.objects.create(id=job_id, task_name="jobs.send_mail", state="REVOKED", submitted_by=alice)
    markers.mark_revoked(job_id)

    send_mail.apply_async(kwargs={"to": "x@example.com", "subject": subject, "body": "b"},
                          task_id=job_id)  # fmt: skip
    marker = send_mail.apply_async(kwargs={"to": "y@example.com", "subject": "after", "body": "b"})
    wait_for(marker.id)  # a later run on the same queue has finished

    assert Job.objects.get(pk=job_id).started_at is None
    assert subject not in mails(worker)


@pytest.mark.broker
def test_a_cancel_reaches_pool_processes_that_hold_their_copy_already(worker, alice):
    # A job type without the duplicate guard checks the worker process's copy of the
    # cancelled runs (guard.RevokedRuns), not the marker: pool processes that ran jobs
    # have subscribed already, and learn of the cancel by Pub/Sub.
    from jobs.tasks.benchmark import noop

    for result in [noop.apply_async(queue="default") for _ in range(6)]:
        wait_for(result.id)
    job_id = str(uuid.uuid4())
    # Cancelled by its marker alone, as beat cancels a run it sent ahead: the worker
    # makes the row REVOKED when it skips the run.
    Job.objects.create(id=job_id, task_name="jobs.noop", submitted_by=alice)
    markers.mark_revoked(job_id)

    noop.apply_async(task_id=job_id, queue="default")
    wait_for(noop.apply_async(queue="default").id)  # a later run on the same queue
    wait_for(noop.apply_async(queue="default").id)  # on either pool process

    job = Job.objects.get(pk=job_id)
    assert job.state == "REVOKED"  # SUCCESS, had it run
    assert job.error_message == "Cancelled before it started"


@pytest.mark.broker
def test_terminating_a_running_job_revokes_it_and_the_worker_keeps_serving(
    worker, alice_client, granted
):
    job = submit(alice_client, "long_sleep", {"seconds": "60", "opt-queue": "default"})
    wait_for(job.id, states={"PROGRESS"})

    action(alice_client, job, "terminate")
    job = wait_for(job.id, timeout=20)
    after = submit(alice_client, "count_primes", {"limit": "1000", "opt-queue": "cpu"})

    assert job.state == "REVOKED"
    assert wait_for(after.id).state == "SUCCESS"
    assert audited(job, "terminate")


@pytest.mark.broker
def test_retrying_a_failed_run_makes_a_new_linked_run_that_succeeds(worker, alice_client, granted):
    until = (timezone.now() + timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%S")
    job = submit(
        alice_client,
        "flaky",
        {"mode": "until", "failures": "0", "message": "db down", "fail_until": until,
         "opt-queue": "default"},
    )  # fmt: skip
    assert wait_for(job.id).state == "FAILURE"
    time.sleep(2.5)

    response = action(alice_client, job, "retry")
    new = Job.objects.get(parent=job)

    assert response["Location"] == new.get_absolute_url()
    assert new.source == "retry"
    assert new.params == job.params
    assert wait_for(new.id).state == "SUCCESS"
    assert audited(job, "retry")


@pytest.mark.broker
def test_rerun_with_edited_parameters_keeps_the_lineage(worker, alice_client, granted):
    job = submit(alice_client, "count_primes", {"limit": "100", "opt-queue": "cpu"})
    wait_for(job.id)

    form = alice_client.get(reverse("jobs-rerun", args=[job.id]))
    response = alice_client.post(
        reverse("jobs-rerun", args=[job.id]),
        {"limit": "1000", "opt-queue": "cpu", "opt-priority": "5", "opt-max_retries": "0"},
    )
    new = Job.objects.get(parent=job)

    assert 'value="100"' in form.content.decode()
    assert response.status_code == 302
    assert new.source == "rerun"
    assert wait_for(new.id).result == {"limit": 1000, "primes": 168}
    assert audited(job, "rerun")


@pytest.mark.broker
def test_pausing_a_queue_holds_new_runs_until_it_is_resumed(worker, operator, client, granted):
    client.force_login(operator)
    granted["count_primes"].allowed_groups.add(*operator.groups.all())
    client.post(reverse("jobs-queue-action", args=["cpu", "pause"]))
    try:
        job = submit(client, "count_primes", {"limit": "1000", "opt-queue": "cpu"})
        # Published after it, on a queue still consumed: once this one has run, the worker
        # would have taken the first too, had the pause not held it.
        later = submit(client, "count_primes", {"limit": "10", "opt-queue": "default"})
        assert wait_for(later.id).state == "SUCCESS"
        depth = {q.name: q.messages for q in broker.queue_depths()}["cpu"]
        page = client.get(reverse("jobs-queues")).content.decode()
        held = Job.objects.get(pk=job.id).state
    finally:
        client.post(reverse("jobs-queue-action", args=["cpu", "resume"]))

    assert held == "PENDING"
    assert depth >= 1
    assert "Paused" in page
    assert wait_for(job.id).state == "SUCCESS"
    assert AuditEntry.objects.filter(action="pause", target_id="cpu").exists()
    assert AuditEntry.objects.filter(action="resume", target_id="cpu").exists()


@pytest.mark.broker
def test_the_workers_page_lists_the_running_worker(worker, operator, client):
    client.force_login(operator)

    page = client.get(reverse("jobs-workers")).content.decode()

    assert f"test-{worker.broker}@" in page
    assert "prefork" in page


@pytest.mark.broker
def test_secret_parameters_are_masked_everywhere_but_reach_the_task(worker, alice_client, granted):
    secret = "correct-horse-battery-staple"
    job = submit(
        alice_client,
        "rotate_credentials",
        {"service": "billing", "new_password": secret, "opt-queue": "default"},
    )
    job = wait_for(job.id)

    page = alice_client.get(job.get_absolute_url()).content.decode()
    logs = " ".join(JobLog.objects.filter(job=job).values_list("message", flat=True))
    audit = str(AuditEntry.objects.get(target_id=job.id, action="submit").details)
    task_result = TaskResult.objects.get(task_id=job.id)

    assert job.state == "SUCCESS"
    assert job.params["new_password"] == secret  # stored for retries, passed to the task
    assert secret not in page and "••••••" in page
    assert "Rotating billing to ••••••" in logs and secret not in logs
    assert secret not in audit
    assert secret not in (task_result.task_kwargs or "")


@pytest.mark.broker
def test_bulk_cancel_asks_for_confirmation_with_the_count(alice_client, alice, granted):
    jobs = [Job.objects.create(id=str(uuid.uuid4()), task_name="jobs.count_primes",
                               job_type=granted["count_primes"], submitted_by=alice,
                               sent_at=timezone.now()) for _ in range(3)]  # fmt: skip
    ids = [job.id for job in jobs]

    confirm = alice_client.post(reverse("jobs-bulk"), {"action": "cancel", "ids": ids})
    done = alice_client.post(
        reverse("jobs-bulk"), {"action": "cancel", "ids": ids, "confirmed": "yes"}
    )

    assert "Cancel 3 runs?" in confirm.content.decode()
    assert done.status_code == 302
    assert set(Job.objects.values_list("state", flat=True)) == {"REVOKED"}
    assert AuditEntry.objects.filter(action="cancel").count() == 3


def test_bulk_over_the_whole_filter_covers_every_matching_run(client, operator, alice, granted):
    for state in ["FAILURE", "FAILURE", "SUCCESS"]:
        Job.objects.create(id=str(uuid.uuid4()), task_name="jobs.count_primes", state=state,
                           job_type=granted["count_primes"], submitted_by=alice)  # fmt: skip
    client.force_login(operator)

    confirm = client.post(
        reverse("jobs-bulk"),
        {"action": "delete", "scope": "filter", "filter_query": "state=FAILURE"},
    )

    assert "Delete 2 runs?" in confirm.content.decode()


def test_a_viewer_is_refused_every_action(client, viewer, alice, granted):
    job = Job.objects.create(id=str(uuid.uuid4()), task_name="jobs.count_primes",
                             job_type=granted["count_primes"], submitted_by=alice,
                             state="FAILURE")  # fmt: skip
    client.force_login(viewer)
    posts = [
        *(reverse("jobs-action", args=[job.id, name]) for name in services.BULK_ACTIONS),
        reverse("jobs-action", args=[job.id, "terminate"]),
        reverse("jobs-rerun", args=[job.id]),
        reverse("jobs-worker-action"),
        *(reverse("jobs-queue-action", args=["default", a]) for a in ["pause", "resume", "purge"]),
    ]

    statuses = {url: client.post(url, {"action": "cancel", "ids": [job.id], "worker": "w@h",
                                       "confirm": "default"}).status_code
                for url in [*posts, reverse("jobs-bulk")]}  # fmt: skip

    assert set(statuses.values()) == {403}, statuses
    assert client.get(reverse("jobs-workers")).status_code == 403
    assert client.get(reverse("jobs-queues")).status_code == 403
    assert Job.objects.get(pk=job.id).state == "FAILURE"
    page = client.get(job.get_absolute_url()).content.decode()
    assert 'id="run-actions"' not in page  # no buttons a viewer may not use


def test_a_submitter_cannot_act_on_another_users_run(bob, alice, granted, client):
    job = Job.objects.create(id=str(uuid.uuid4()), task_name="jobs.count_primes",
                             job_type=granted["count_primes"], submitted_by=alice)  # fmt: skip
    client.force_login(bob)

    assert client.post(reverse("jobs-action", args=[job.id, "cancel"])).status_code == 404
    assert Job.objects.get(pk=job.id).state == "PENDING"


@pytest.mark.broker
def test_purging_needs_a_superuser_and_the_queue_name(client, operator, admin_user):
    client.force_login(operator)
    assert client.post(reverse("jobs-queue-action", args=["cpu", "purge"]),
                       {"confirm": "cpu"}).status_code == 403  # fmt: skip

    client.force_login(admin_user)
    client.post(reverse("jobs-queue-action", args=["cpu", "purge"]), {"confirm": "wrong"})
    assert not AuditEntry.objects.filter(action="purge").exists()
    client.post(reverse("jobs-queue-action", args=["cpu", "purge"]), {"confirm": "cpu"})
    assert AuditEntry.objects.filter(action="purge", target_id="cpu").exists()
