"""Submitting from the form: validation, permissions, options, bad input (no worker)."""

import pytest
from django.urls import reverse

from jobs.models import Job

VALID_PRIMES = {"limit": "1000", "opt-queue": "cpu", "opt-priority": "7", "opt-max_retries": "0"}


def submit_url(name: str) -> str:
    return reverse("jobs-submit", args=[name])


def test_the_submit_list_shows_only_job_types_the_user_may_run(alice_client, job_types, submitters):
    job_types["count_primes"].allowed_groups.add(submitters)

    page = alice_client.get(reverse("jobs-submit-list")).content.decode()

    assert "Count primes" in page
    assert "Send mail" not in page


def test_a_valid_form_stores_a_pending_run_and_redirects_to_it(
    alice_client, alice, granted, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        response = alice_client.post(submit_url("count_primes"), VALID_PRIMES)

    job = Job.objects.get()
    assert response.status_code == 302
    assert response["Location"] == job.get_absolute_url()
    assert job.state == "PENDING"
    assert job.params == {"limit": 1000}
    assert job.submitted_by == alice
    assert (job.queue, job.priority) == ("cpu", 7)
    assert job.task_name == "jobs.count_primes"
    assert len(callbacks) == 1  # published only once the transaction commits


def test_the_form_page_shows_typed_fields_with_defaults(alice_client, granted):
    page = alice_client.get(submit_url("generate_report")).content.decode()

    assert 'name="days"' in page and 'type="number"' in page
    assert 'value="30"' in page
    assert "Advanced options" in page
    assert '<option value="reports" selected>' in page


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"limit": "1"}, "limit", "greater than or equal to 2"),
        ({"limit": "many"}, "limit", "Enter a whole number"),
        ({}, "limit", "This field is required"),
        ({"limit": "100", "opt-queue": "secret-queue"}, "opt-queue", "Select a valid choice"),
        ({"limit": "100", "opt-priority": "12"}, "opt-priority", "less than or equal to 9"),
        ({"limit": "100", "opt-run_at": "2001-01-01T00:00"}, "opt-run_at", "in the past"),
    ],
)
def test_invalid_input_shows_the_error_and_saves_nothing(
    alice_client, granted, data, field, message
):
    payload = {**VALID_PRIMES, **data}
    if not data:
        payload.pop("limit")

    response = alice_client.post(submit_url("count_primes"), payload)

    assert response.status_code == 400
    errors = response.context["form"].errors | {
        f"opt-{k}": v for k, v in response.context["options_form"].errors.items()
    }
    assert any(message in error for error in errors[field]), errors
    assert not Job.objects.exists()


def test_parameters_over_the_size_limit_are_refused(alice_client, granted, settings):
    settings.JOBSITE_MAX_PARAMS_BYTES = 100
    payload = {
        "to": "a@example.com",
        "subject": "s",
        "body": "x" * 200,
        "opt-queue": "default",
        "opt-priority": "5",
        "opt-max_retries": "0",
    }

    response = alice_client.post(submit_url("send_mail"), payload)

    assert response.status_code == 400
    assert "the limit is 100 bytes" in response.content.decode()
    assert not Job.objects.exists()


def test_an_unknown_job_type_is_404(alice_client, granted):
    assert alice_client.get(submit_url("rm_rf")).status_code == 404
    assert alice_client.post(submit_url("rm_rf"), {"task": "os.system"}).status_code == 404
    assert not Job.objects.exists()


def test_a_disabled_job_type_is_403(alice_client, granted):
    granted["count_primes"].enabled = False
    granted["count_primes"].save()

    response = alice_client.post(submit_url("count_primes"), VALID_PRIMES)

    assert response.status_code == 403
    assert not Job.objects.exists()


def test_a_job_type_not_granted_to_the_user_is_403(alice_client, job_types):
    assert alice_client.get(submit_url("count_primes")).status_code == 403
    assert alice_client.post(submit_url("count_primes"), VALID_PRIMES).status_code == 403
    assert not Job.objects.exists()


def test_a_superuser_may_run_every_job_type(client, admin_user, job_types):
    client.force_login(admin_user)

    response = client.post(submit_url("count_primes"), VALID_PRIMES)

    assert response.status_code == 302
    assert Job.objects.count() == 1


def test_an_idempotency_key_returns_the_existing_run(alice_client, granted):
    payload = {**VALID_PRIMES, "opt-idempotency_key": "nightly-2026-11-27"}

    first = alice_client.post(submit_url("count_primes"), payload)
    second = alice_client.post(submit_url("count_primes"), payload)

    assert Job.objects.count() == 1
    assert first["Location"] == second["Location"]


def test_a_countdown_sets_the_earliest_start(alice_client, granted):
    alice_client.post(submit_url("count_primes"), {**VALID_PRIMES, "opt-countdown": "600"})

    job = Job.objects.get()
    assert job.eta is not None
    assert 590 <= (job.eta - job.created_at).total_seconds() <= 610


def test_anonymous_users_are_sent_to_the_login_page(client, job_types):
    for url in [reverse("jobs-history"), reverse("jobs-submit-list"), submit_url("count_primes")]:
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))


def test_csrf_is_enforced_on_the_submit_form(granted, alice):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)

    response = client.post(submit_url("count_primes"), VALID_PRIMES)

    assert response.status_code == 403
    assert not Job.objects.exists()
