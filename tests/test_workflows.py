"""Workflows: chains, groups and chords of job types, each step a run, on real brokers."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied
from django.urls import reverse

from jobs import services, workflows
from jobs.models import AuditEntry, Job, JobSource, JobState
from jobs.tasks import workflows as demo_workflows
from jobs.worker import guard
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db


def steps_of(root: Job) -> list[Job]:
    return list(Job.objects.filter(workflow_id=root.pk).order_by("created_at", "id"))


def planned(root: Job, job_type: str) -> list[Job]:
    return [s for s in steps_of(root) if s.job_type and s.job_type.name == job_type]


def wait_for_errback(root: Job, timeout: float = 30) -> Job:
    """The errback's run is recorded by the worker when it runs (no row before)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = Job.objects.filter(task_name="jobs.workflow_failed", workflow_id=root.pk).first()
        if run is not None and run.state == JobState.SUCCESS:
            return run
        time.sleep(0.1)
    raise AssertionError("the workflow's errback did not run")


# --- Submitting: rows before any worker sees them --------------------------------------


def test_every_step_is_a_pending_run_with_its_links_before_it_is_published(
    alice, granted, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        root = services.workflow_submit(
            workflow="primes_sum", params={"limit": 1000, "parts": 3}, user=alice
        )

    assert len(callbacks) == 1  # publishing waits for the commit
    steps = steps_of(root)
    assert len(steps) == 4
    assert {s.state for s in steps} == {JobState.PENDING}
    assert {s.workflow_id for s in steps} == {root.pk}
    assert {s.source for s in steps} == {JobSource.WORKFLOW}
    assert all(s.sent_at is None and s.submitted_by == alice for s in steps)
    header = planned(root, "count_primes_range")
    body = planned(root, "sum_results")[0]
    assert root.pk == header[0].pk
    assert sorted(body.options["workflow"]["parents"]) == sorted(s.pk for s in header)
    assert [s.params for s in header] == [
        {"low": 0, "high": 333},
        {"low": 333, "high": 666},
        {"low": 666, "high": 1000},
    ]
    plan = root.options["workflow"]["plan"]
    assert [s["id"] for s in workflows.steps(plan)] == [s.pk for s in header] + [body.pk]
    assert AuditEntry.objects.filter(target_type="workflow", target_id=root.pk).exists()


def test_a_step_the_user_may_not_run_refuses_the_whole_workflow(bob, job_types):
    with pytest.raises(PermissionDenied):
        services.workflow_submit(
            workflow="report_then_mail",
            params={"title": "t", "region": "emea", "days": 1, "rows_per_day": 1,
                    "to": "a@example.com", "subject": "s"},
            user=bob,
        )  # fmt: skip

    assert not Job.objects.exists()


def test_the_form_refuses_bad_parameters_and_stores_nothing(alice_client, granted):
    url = reverse("jobs-workflow-new", args=["primes_sum"])

    response = alice_client.post(url, {"limit": "1000", "parts": "0"})

    assert response.status_code == 400
    assert "greater than or equal to 1" in response.content.decode()
    assert not Job.objects.exists()


def test_a_user_without_the_job_types_gets_a_403(client, bob, job_types):
    client.force_login(bob)

    assert client.get(reverse("jobs-workflow-new", args=["primes_sum"])).status_code == 403
    assert "Primes in parallel" not in client.get(reverse("jobs-workflow-list")).content.decode()


@pytest.mark.broker
def test_cancelling_a_workflow_cancels_its_unfinished_steps(
    alice, granted, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False):
        root = services.workflow_submit(
            workflow="primes_sum", params={"limit": 1000, "parts": 2}, user=alice
        )

    cancelled, errors = services.workflow_cancel(root=root, user=alice)

    assert errors == []
    assert sorted(cancelled) == sorted(s.pk for s in steps_of(root))
    assert {s.state for s in steps_of(root)} == {JobState.REVOKED}
    assert all(guard.is_revoked(s.pk) for s in steps_of(root))  # skipped if delivered
    audit = AuditEntry.objects.get(target_type="workflow", action="cancel")
    assert audit.details["cancelled"] == cancelled
    assert AuditEntry.objects.filter(target_type="run", action="cancel").count() == 3


def test_someone_else_cannot_cancel_a_workflow(
    alice, bob, granted, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False):
        root = services.workflow_submit(
            workflow="primes_sum", params={"limit": 1000, "parts": 2}, user=alice
        )

    with pytest.raises(PermissionDenied):
        services.workflow_cancel(root=root, user=bob)
    assert {s.state for s in steps_of(root)} == {JobState.PENDING}


# --- Running on real workers -------------------------------------------------------------


@pytest.mark.broker
def test_a_chain_passes_the_report_to_the_mail_step(worker, alice_client, granted):
    response = alice_client.post(
        reverse("jobs-workflow-new", args=["report_then_mail"]),
        {"title": "Weekly", "region": "apac", "days": "3", "rows_per_day": "5",
         "to": "boss@example.com", "subject": "Weekly totals"},
    )  # fmt: skip
    assert response.status_code == 302
    root = Job.objects.get(pk=response["Location"].rstrip("/").rsplit("/", 1)[-1])

    report, mail = planned(root, "generate_report")[0], planned(root, "mail_summary")[0]
    mail = wait_for(mail.pk)
    report.refresh_from_db()

    assert report.state == mail.state == JobState.SUCCESS
    assert mail.result["summary"] == report.result  # the chain passed the result along
    assert report.result["rows"] == 15
    sent = "".join(p.read_text() for p in worker.mail_dir.glob("*.log"))
    assert f"total: {report.result['total']}" in sent
    page = alice_client.get(reverse("jobs-workflow", args=[root.pk])).content.decode()
    assert "Report, then mail it" in page and "Mail to boss@example.com" in page
    run_page = alice_client.get(mail.get_absolute_url()).content.decode()
    assert 'id="workflow-tree"' in run_page and "Weekly (apac)" in run_page


@pytest.mark.broker
def test_a_chord_sums_the_counts_of_its_group(worker, alice, granted):
    root = services.workflow_submit(
        workflow="primes_sum", params={"limit": 1_000_000, "parts": 4}, user=alice
    )

    body = wait_for(planned(root, "sum_results")[0].pk)

    assert body.state == JobState.SUCCESS
    assert body.result == {"primes": 78498, "parts": 4, "partial": False}
    header = planned(root, "count_primes_range")
    assert {s.state for s in header} == {JobState.SUCCESS}
    assert sum(s.result["primes"] for s in header) == 78498
    assert body.started_at >= max(s.finished_at for s in header)


@pytest.mark.broker
def test_an_errback_records_the_failed_step_and_the_rest_is_not_run(worker, alice, granted):
    root = services.workflow_submit(
        workflow="flaky_then_mail",
        params={"mode": "fail", "failures": 0, "to": "ops@example.com"},
        user=alice,
    )

    errback = wait_for_errback(root)

    flaky, mail = planned(root, "flaky")[0], planned(root, "mail_summary")[0]
    flaky.refresh_from_db()
    mail.refresh_from_db()
    assert flaky.state == JobState.FAILURE
    assert mail.state == JobState.REVOKED and mail.started_at is None
    assert mail.error_message == f"Not run: the step {flaky.pk} failed."
    assert errback.result["failed_step"] == flaky.pk
    assert errback.result["not_run"] == [mail.pk]
    assert "SimulatedFailure" in errback.result["error"]
    assert errback.submitted_by == alice and errback.source == JobSource.WORKFLOW
    root.refresh_from_db()
    assert root.options["workflow"]["failure"]["failed_step"] == flaky.pk


@pytest.mark.broker
def test_a_failing_chord_member_fires_the_errback_on_the_callback(
    worker, alice, granted, monkeypatch
):
    def plan(params: dict) -> dict:
        return workflows.in_chord(
            [
                workflows.step("count_primes_range", {"low": 0, "high": 1000}, "Part 1"),
                workflows.step("flaky", {"mode": "fail", "failures": 0, "message": "boom"}, "Bad"),
            ],
            workflows.step("sum_results", {"field": "primes"}, "Sum", takes_result=True),
        )

    template = workflows.WorkflowTemplate(
        "broken_chord", "Broken chord", "", "chord", demo_workflows.PrimesSumForm, plan
    )
    monkeypatch.setitem(workflows.TEMPLATES, "broken_chord", template)
    root = services.workflow_submit(workflow="broken_chord", params={}, user=alice)

    errback = wait_for_errback(root)

    bad, body = planned(root, "flaky")[0], planned(root, "sum_results")[0]
    body.refresh_from_db()  # failed by Celery with ChordError, then marked as not run
    assert body.state == JobState.REVOKED and body.started_at is None
    assert body.error_message == f"Not run: the step {bad.pk} failed."
    assert errback.result["failed_step"] == bad.pk  # the culprit, not the callback
    assert errback.result["step"] == "Bad"


@pytest.mark.broker
def test_the_relay_publishes_a_workflow_stored_while_the_broker_was_down(worker, alice, granted):
    services.broker_breaker.tripped()  # as after a failed publish: store, do not send
    try:
        root = services.workflow_submit(
            workflow="report_then_mail",
            params={"title": "Late", "region": "emea", "days": 1, "rows_per_day": 2,
                    "to": "late@example.com", "subject": "Late"},
            user=alice,
        )  # fmt: skip
        assert {s.sent_at for s in steps_of(root)} == {None}
    finally:
        services.broker_breaker.reset()

    assert services.jobs_relay(min_age=0) == 2  # each step counted, the canvas sent once

    mail = wait_for(planned(root, "mail_summary")[0].pk)
    assert mail.state == JobState.SUCCESS
    assert mail.result["summary"]["rows"] == 2
