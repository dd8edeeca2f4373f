"""The JSON API: runs, submit, cancel/retry, job types, schedules (jobs.api.views)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from jobs import catalog, services
from jobs.models import AuditAction, AuditEntry, Job, JobState, JobType
from tests.api.conftest import RUNS, VALID_PRIMES, ApiClient, body, catalog_job_type, make_run
from tests.conftest import wait_for

# --- Listing runs -------------------------------------------------------------------


def test_the_list_shows_only_the_users_own_runs(api, alice, bob):
    primes = catalog_job_type("count_primes")
    mine = make_run(alice, primes, params={"limit": 10})
    make_run(bob, primes, params={"limit": 20})

    data = body(api.get(RUNS))

    assert [run["id"] for run in data["results"]] == [mine.pk]
    assert data["next"] is None
    assert data["results"][0]["params"] == {"limit": 10}
    assert data["results"][0]["url"] == f"http://testserver{RUNS}{mine.pk}/"


def test_the_cursor_walks_every_run_once_newest_first(api, alice):
    primes = catalog_job_type("count_primes")
    now = timezone.now()
    # Pairs of runs share a timestamp: the cursor must order ties by id, not skip them.
    runs = [make_run(alice, primes, created_at=now - timedelta(seconds=i // 2)) for i in range(23)]
    expected = [r.pk for r in sorted(runs, key=lambda r: (r.created_at, r.pk), reverse=True)]

    seen, url, pages = [], f"{RUNS}?page_size=5", 0
    while url:
        data = body(api.get(url))
        seen += [run["id"] for run in data["results"]]
        url, pages = data["next"], pages + 1

    assert seen == expected
    assert pages == 5


def test_filters_are_the_history_pages(api, alice):
    primes, sleep = catalog_job_type("count_primes"), catalog_job_type("long_sleep")
    failed = make_run(alice, primes, state=JobState.FAILURE, error_message="disk full")
    make_run(alice, primes, state=JobState.SUCCESS)
    slept = make_run(alice, sleep, state=JobState.FAILURE)

    def ids(**params):
        return {run["id"] for run in body(api.get(RUNS, params))["results"]}

    assert ids(state="FAILURE") == {failed.pk, slept.pk}
    assert ids(state="FAILURE", job_type="count_primes") == {failed.pk}
    assert ids(q="disk") == {failed.pk}
    assert ids(submitted_after=(timezone.now() + timedelta(hours=1)).isoformat()) == set()


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"state": "BOGUS"}, "state", "Select a valid choice"),
        ({"job_type": "no_such_type"}, "job_type", "Select a valid choice"),
        ({"submitted_after": "yesterday"}, "submitted_after", "Enter a valid date/time"),
        ({"q": "a\x00b"}, "q", "Null characters are not allowed"),
        ({"cursor": "not-a-cursor"}, "cursor", "Invalid cursor"),
        ({"page_size": "0"}, "page_size", "greater than or equal to 1"),
        ({"page_size": "many"}, "page_size", "A valid integer is required"),
        ({"page_size": ""}, "page_size", "A valid integer is required"),
    ],
)
def test_invalid_filters_are_a_400_with_the_field_errors(api, job_types, params, field, message):
    response = api.get(RUNS, params)

    assert response.status_code == 400
    assert message in body(response)[field][0]


# --- One run --------------------------------------------------------------------------


def test_a_run_is_shown_with_its_secret_parameters_masked(api, alice, secret_job_type):
    run = make_run(
        alice, secret_job_type, params={"service": "billing", "api_key": "hunter2-hunter2"}
    )

    for response in (api.get(f"{RUNS}{run.pk}/"), api.get(RUNS)):
        text = response.content.decode()
        assert "hunter2" not in text
        assert catalog.MASK in text
    assert body(api.get(f"{RUNS}{run.pk}/"))["params"] == {
        "service": "billing",
        "api_key": catalog.MASK,
    }


@pytest.mark.parametrize("run_id", ["someone-elses", "no-such-run", "nul\x00char"])
def test_a_run_the_user_may_not_see_is_a_404(api, bob, run_id):
    make_run(bob, catalog_job_type("count_primes"), id="someone-elses")

    response = api.get(f"{RUNS}{run_id}/")

    assert response.status_code == 404
    assert body(response)["detail"] == "No such run."


# --- Submitting -------------------------------------------------------------------------


def test_submit_stores_a_pending_run_from_the_api_and_publishes_on_commit(
    api, alice, granted, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        response = api.post(RUNS, {**VALID_PRIMES, "options": {"priority": 8, "queue": "cpu"}})

    assert response.status_code == 201
    data = body(response)
    job = Job.objects.get()
    assert data["id"] == job.pk and data["state"] == "PENDING"
    assert (job.source, job.submitted_by, job.params) == ("api", alice, {"limit": 1000})
    assert (job.queue, job.priority) == ("cpu", 8)
    assert len(callbacks) == 1
    assert AuditEntry.objects.filter(action=AuditAction.SUBMIT, target_id=job.pk).exists()


@pytest.mark.broker
def test_a_run_submitted_through_the_api_reaches_success_on_a_real_worker(
    worker, client, alice, granted
):
    _, secret = services.api_token_create(user=alice, name="worker test")
    api = ApiClient(client, secret)

    response = api.post(RUNS, {**VALID_PRIMES, "options": {"queue": "cpu"}})
    assert response.status_code == 201, response.content
    wait_for(body(response)["id"])

    data = body(api.get(body(response)["url"]))
    assert data["state"] == "SUCCESS"
    assert data["result"] == {"limit": 1000, "primes": 168}
    assert data["worker"].startswith(f"test-{worker.broker}@")


def test_submit_masks_secret_parameters_in_its_answer_and_audit(api, secret_job_type):
    response = api.post(
        RUNS, {"job_type": "api_test_secret", "params": {"service": "s", "api_key": "k-secret"}}
    )

    assert response.status_code == 201
    assert "k-secret" not in response.content.decode()
    assert Job.objects.get().params["api_key"] == "k-secret"  # the job itself gets it
    assert "k-secret" not in json.dumps(list(AuditEntry.objects.values("details")))


@pytest.mark.parametrize(
    ("payload", "errors"),
    [
        (
            {"params": {"limit": 1}, "options": {"priority": 12, "queue": "nope"}},
            {
                "params": {"limit": ["Ensure this value is greater than or equal to 2."]},
                "options": {
                    "queue": ["Select a valid choice. nope is not one of the available choices."],
                    "priority": ["Ensure this value is less than or equal to 9."],
                },
            },
        ),
        ({"params": {}}, {"params": {"limit": ["This field is required."]}}),
        ({"params": {"limit": "many"}}, {"params": {"limit": ["Enter a whole number."]}}),
        (
            {"params": {"limit": 10, "extra": 1}, "options": {"run_at": {"a": 1}}},
            {
                "params": {"extra": ["Unknown field."]},
                "options": {"run_at": ["Expected a string, a number or a boolean."]},
            },
        ),
        (
            {"params": {"limit": 10}, "options": {"run_at": "2001-01-01T00:00:00Z"}},
            {"options": {"run_at": ["This time is in the past."]}},
        ),
        ({"params": [1, 2]}, {"params": ['Expected a dictionary of items but got type "list".']}),
    ],
)
def test_invalid_params_or_options_are_a_400_per_field_and_store_nothing(
    api, granted, payload, errors
):
    response = api.post(RUNS, {"job_type": "count_primes", **payload})

    assert response.status_code == 400
    assert body(response) == errors
    assert not Job.objects.exists()


def test_a_body_that_is_not_json_is_refused(alice_secret, client, granted):
    response = client.post(
        RUNS, {"job_type": "count_primes"}, headers={"Authorization": f"Bearer {alice_secret}"}
    )
    assert response.status_code == 415
    response = client.post(
        RUNS, "{oops", content_type="application/json",
        headers={"Authorization": f"Bearer {alice_secret}"},
    )  # fmt: skip
    assert response.status_code == 400
    assert "JSON parse error" in body(response)["detail"]


def test_an_unknown_job_type_is_a_404(api, granted):
    response = api.post(RUNS, {"job_type": "rm_rf", "params": {}})

    assert response.status_code == 404
    assert body(response)["detail"] == "No job type named “rm_rf”."


def test_a_job_type_the_user_may_not_run_or_that_is_disabled_is_a_403(api, job_types, submitters):
    response = api.post(RUNS, VALID_PRIMES)
    assert response.status_code == 403
    assert body(response)["detail"] == "You may not run “Count primes”."

    job_types["count_primes"].allowed_groups.add(submitters)
    JobType.objects.filter(name="count_primes").update(enabled=False)
    response = api.post(RUNS, VALID_PRIMES)
    assert response.status_code == 403
    assert body(response)["detail"] == "“Count primes” is disabled."
    assert not Job.objects.exists()


def test_parameters_over_the_size_limit_are_a_413(api, granted, settings):
    settings.JOBSITE_MAX_PARAMS_BYTES = 60
    params = {"to": "a@example.com", "subject": "s" * 50, "body": "b"}

    response = api.post(RUNS, {"job_type": "send_mail", "params": params})

    assert response.status_code == 413
    assert "the limit is 60 bytes" in body(response)["detail"]
    assert not Job.objects.exists()


def test_an_idempotency_key_returns_the_existing_run_with_200(api, granted):
    payload = {**VALID_PRIMES, "options": {"idempotency_key": "nightly-2024-01-01"}}

    first = api.post(RUNS, payload)
    again = api.post(RUNS, payload)

    assert (first.status_code, again.status_code) == (201, 200)
    assert body(first)["id"] == body(again)["id"]
    assert Job.objects.count() == 1


# --- Cancel and retry -------------------------------------------------------------------


@pytest.mark.broker
def test_cancel_stops_a_pending_run(api, alice):
    run = make_run(alice, catalog_job_type("long_sleep"))

    response = api.post(f"{RUNS}{run.pk}/cancel/")

    assert response.status_code == 200
    assert body(response)["state"] == "REVOKED"
    assert Job.objects.get(pk=run.pk).state == JobState.REVOKED


def test_cancelling_a_finished_run_is_a_409_with_the_reason(api, alice):
    run = make_run(alice, catalog_job_type("long_sleep"), state=JobState.SUCCESS)

    response = api.post(f"{RUNS}{run.pk}/cancel/")

    assert response.status_code == 409
    assert body(response)["detail"] == (
        "Only a run that has not started can be cancelled; this one is succeeded."
    )


def test_retry_makes_a_new_linked_run(api, alice, granted):
    run = make_run(alice, granted["count_primes"], state=JobState.FAILURE, params={"limit": 50})

    response = api.post(f"{RUNS}{run.pk}/retry/")

    assert response.status_code == 201
    data = body(response)
    assert data["parent"] == run.pk and data["id"] != run.pk
    assert data["params"] == {"limit": 50} and data["source"] == "retry"
    assert api.post(f"{RUNS}{data['id']}/retry/").status_code == 409  # still pending


def test_controlling_a_visible_run_of_another_user_needs_permission(api, alice, bob):
    alice.user_permissions.add(Permission.objects.get(codename="view_all_jobs"))
    run = make_run(bob, catalog_job_type("long_sleep"))

    for action in ("cancel", "retry"):
        response = api.post(f"{RUNS}{run.pk}/{action}/")
        assert response.status_code == 403
        assert body(response)["detail"] == "You may not control this run."
    assert api.post(f"{RUNS}missing/cancel/").status_code == 404
    assert Job.objects.get(pk=run.pk).state == JobState.PENDING


# --- Job types --------------------------------------------------------------------------


def test_job_types_are_those_the_user_may_run_with_json_schemas(api, job_types, submitters):
    job_types["generate_report"].allowed_groups.add(submitters)
    job_types["send_mail"].allowed_groups.add(submitters)

    data = {jt["name"]: jt for jt in body(api.get("/api/job-types/"))}

    assert set(data) == {"generate_report", "send_mail"}
    report = data["generate_report"]
    assert report["queues"] == ["reports", "default"]
    days = report["params_schema"]["properties"]["days"]
    assert days == {
        "type": "integer", "minimum": 1, "maximum": 366, "title": "Days",
        "description": "One CSV section per day.", "default": 30,
    }  # fmt: skip
    assert report["params_schema"]["properties"]["region"]["enum"] == ["emea", "amer", "apac"]
    assert report["params_schema"]["properties"]["title"]["maxLength"] == 100
    assert data["send_mail"]["params_schema"]["required"] == ["to", "subject", "body"]
    assert data["send_mail"]["params_schema"]["properties"]["to"]["format"] == "email"
    options = report["options_schema"]["properties"]
    assert options["queue"]["enum"] == ["reports", "default"]
    assert options["queue"]["default"] == "reports"
    assert options["run_at"]["format"] == "date-time"


# --- Schedules ------------------------------------------------------------------------------


@pytest.fixture
def schedule(secret_job_type) -> PeriodicTask:
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.MINUTES)
    return PeriodicTask.objects.create(
        name="Rotate nightly",
        task="jobs.api_test_secret",
        interval=every,
        kwargs=json.dumps({"service": "db", "api_key": "top-secret"}),
    )


def test_schedules_are_listed_with_secret_kwargs_masked(api, alice, schedule):
    alice.user_permissions.add(Permission.objects.get(codename="view_periodictask"))

    response = api.get("/api/schedules/")

    assert response.status_code == 200
    [data] = body(response)
    assert data["name"] == "Rotate nightly" and data["job_type"] == "api_test_secret"
    assert data["kwargs"] == {"service": "db", "api_key": catalog.MASK}
    assert data["schedule"] == "every 10 minutes"
    assert data["enabled"] is True and data["total_run_count"] == 0
    assert "top-secret" not in response.content.decode()


def test_schedules_are_a_403_without_the_permission(api, schedule):
    response = api.get("/api/schedules/")

    assert response.status_code == 403
    assert "view_periodictask" in body(response)["detail"]
