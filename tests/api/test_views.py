"""The JSON API: authentication, runs, submit, cancel/retry, job types, schedules, tokens."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import timedelta

import pytest
from django import forms
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from jobs import catalog, services, specs
from jobs.api.form_schema import form_json_schema
from jobs.models import ApiToken, AuditAction, AuditEntry, Job, JobState, JobType
from tests.conftest import wait_for

RUNS = "/api/runs/"
VALID_PRIMES = {"job_type": "count_primes", "params": {"limit": 1000}}


# --- Fixtures -----------------------------------------------------------------------


@pytest.fixture
def alice_secret(alice) -> str:
    _, secret = services.api_token_create(user=alice, name="tests")
    return secret


@pytest.fixture
def api(client, alice_secret):
    """Alice's API client: her token on every request."""
    return ApiClient(client, alice_secret)


class ApiClient:
    def __init__(self, client: Client, secret: str | None, keyword: str = "Bearer") -> None:
        self.client = client
        self.headers = {"Authorization": f"{keyword} {secret}"} if secret else {}

    def get(self, url: str, params: dict | None = None):
        return self.client.get(url, params or {}, headers=self.headers)

    def post(self, url: str, body=None):
        return self.client.post(
            url, json.dumps(body or {}), content_type="application/json", headers=self.headers
        )


class SecretParams(forms.Form):
    service = forms.CharField(max_length=50)
    api_key = forms.CharField(max_length=100)


@pytest.fixture
def secret_job_type(db, submitters):
    """A job type with a secret parameter, declared for the test only."""
    spec = catalog.JobSpec(
        name="api_test_secret",
        task_name="jobs.api_test_secret",
        form=SecretParams,
        title="Secret test",
        secret_fields=("api_key",),
    )
    catalog.register(spec)
    job_type = JobType.objects.create(name=spec.name, **spec.defaults())
    job_type.allowed_groups.add(submitters)
    yield job_type
    specs._registry.pop(spec.name, None)


def make_run(user, job_type, **fields) -> Job:
    fields.setdefault("id", str(uuid.uuid4()))
    return Job.objects.create(
        job_type=job_type, task_name=job_type.task_name, submitted_by=user, **fields
    )


def body(response) -> dict:
    assert response["Content-Type"] == "application/json", response.content[:500]
    return response.json()


# --- Authentication -----------------------------------------------------------------

ENDPOINTS = [
    ("get", RUNS),
    ("post", RUNS),
    ("get", f"{RUNS}some-run/"),
    ("post", f"{RUNS}some-run/cancel/"),
    ("post", f"{RUNS}some-run/retry/"),
    ("get", "/api/job-types/"),
    ("get", "/api/schedules/"),
    ("get", "/api/schema"),
]


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_an_anonymous_request_gets_a_json_401_not_a_redirect(client, db, method, url):
    response = getattr(ApiClient(client, None), method)(url)

    assert response.status_code == 401
    assert body(response)["detail"] == "Authentication credentials were not provided."
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_a_wrong_token_is_a_401(client, alice_secret, method, url):
    response = getattr(ApiClient(client, alice_secret + "x"), method)(url)

    assert response.status_code == 401
    assert body(response)["detail"] == "Invalid token."


def test_a_token_authenticates_as_its_user_with_bearer_or_token(client, alice, alice_secret):
    run = make_run(alice, catalog_job_type("long_sleep"), params={"seconds": 1})

    for keyword in ("Bearer", "Token"):
        response = ApiClient(client, alice_secret, keyword).get(f"{RUNS}{run.pk}/")
        assert response.status_code == 200
        assert body(response)["submitted_by"] == "alice"


def test_a_revoked_token_is_refused(client, alice, alice_secret):
    token = ApiToken.objects.get(user=alice)
    services.api_token_revoke(token=token, user=alice)

    response = ApiClient(client, alice_secret).get(RUNS)

    assert response.status_code == 401
    assert body(response)["detail"] == "This token has been revoked."


def test_a_token_of_an_inactive_user_is_refused(client, alice, alice_secret):
    alice.is_active = False
    alice.save()

    assert ApiClient(client, alice_secret).get(RUNS).status_code == 401


def test_only_a_hash_and_a_prefix_of_the_token_are_stored(alice, alice_secret):
    token = ApiToken.objects.get(user=alice)

    assert token.key_hash == hashlib.sha256(alice_secret.encode()).hexdigest()
    assert token.prefix == alice_secret[:8]
    stored = json.dumps(list(ApiToken.objects.values()), default=str)
    assert alice_secret not in stored


def test_last_use_is_recorded_at_most_once_a_minute(api, alice):
    token = ApiToken.objects.get(user=alice)
    assert token.last_used_at is None

    api.get(RUNS)
    first = ApiToken.objects.get(pk=token.pk).last_used_at
    api.get(RUNS)
    assert ApiToken.objects.get(pk=token.pk).last_used_at == first  # not rewritten

    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(minutes=2))
    api.get(RUNS)
    assert ApiToken.objects.get(pk=token.pk).last_used_at > first


def test_a_session_works_but_a_post_needs_the_csrf_token(alice, granted):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)

    assert browser.get(RUNS).status_code == 200
    response = browser.post(RUNS, VALID_PRIMES, content_type="application/json")
    assert response.status_code == 403
    assert "CSRF" in body(response)["detail"]
    assert not Job.objects.exists()


# --- Listing runs -------------------------------------------------------------------


def catalog_job_type(name: str) -> JobType:
    services.jobtypes_sync()
    return JobType.objects.get(name=name)


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


def test_the_form_schema_covers_every_field_kind():
    class Everything(forms.Form):
        flag = forms.BooleanField(required=False, initial=True)
        when = forms.DateTimeField(help_text="When.")
        ratio = forms.FloatField(min_value=0.5)
        amount = forms.DecimalField(max_value=10)
        site = forms.URLField(assume_scheme="https")
        kind = forms.ChoiceField(choices=[("", "—"), ("a", "A")], required=False)

    schema = form_json_schema(Everything())

    props = schema["properties"]
    assert props["flag"] == {"type": "boolean", "title": "Flag", "default": True}
    assert props["when"] == {
        "type": "string", "format": "date-time", "title": "When", "description": "When."
    }  # fmt: skip
    assert props["ratio"] == {"type": "number", "minimum": 0.5, "title": "Ratio"}
    assert props["amount"] == {"type": "number", "maximum": 10, "title": "Amount"}
    assert props["site"]["format"] == "uri"
    assert props["kind"]["enum"] == ["a"]
    assert schema["required"] == ["when", "ratio", "amount", "site"]
    assert schema["additionalProperties"] is False


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


# --- The tokens page --------------------------------------------------------------------------


TOKENS = "/account/tokens/"


def test_the_tokens_page_shows_a_new_secret_once_and_it_works(alice_client, alice, client):
    response = alice_client.post(TOKENS, {"name": "import script"})

    assert response.status_code == 200
    secret = response.context["new_secret"]
    assert secret in response.content.decode()
    assert response["Cache-Control"].startswith("max-age=0")
    token = ApiToken.objects.get(user=alice, name="import script")
    assert token.prefix == secret[:8]
    page = alice_client.get(TOKENS).content.decode()
    assert "import script" in page and token.prefix in page and secret not in page
    entry = AuditEntry.objects.get(action=AuditAction.TOKEN_CREATE)
    assert entry.actor == alice and entry.target_id == str(token.pk)


def test_a_token_name_is_required(alice_client, alice):
    response = alice_client.post(TOKENS, {"name": ""})

    assert response.status_code == 400
    assert "This field is required" in response.content.decode()
    assert not ApiToken.objects.exists()


def test_revoking_from_the_tokens_page_needs_a_post_and_the_owner(
    alice_client, alice, alice_secret, bob
):
    token = ApiToken.objects.get(user=alice)
    services.api_token_create(user=bob, name="bob's")
    bobs_token = ApiToken.objects.get(user=bob)
    url = reverse("account-token-revoke", args=[token.pk])

    assert alice_client.get(url).status_code == 405
    bobs_url = reverse("account-token-revoke", args=[bobs_token.pk])
    assert alice_client.post(bobs_url).status_code == 404
    response = alice_client.post(url)

    assert response.status_code == 302
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None
    assert ApiToken.objects.get(pk=bobs_token.pk).revoked_at is None
    assert AuditEntry.objects.filter(action=AuditAction.TOKEN_REVOKE).count() == 1
    again = alice_client.post(url, follow=True)
    assert "already revoked" in again.content.decode()


def test_the_tokens_page_needs_a_login(client, db):
    response = client.get(TOKENS)

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


# --- The admin ------------------------------------------------------------------------------


def test_staff_create_a_token_in_the_admin_and_see_its_secret_once(client, admin_user, alice):
    client.force_login(admin_user)

    response = client.post(
        reverse("admin:jobs_apitoken_add"), {"user": alice.pk, "name": "ci"}, follow=True
    )

    token = ApiToken.objects.get(user=alice, name="ci")
    [message] = [str(m) for m in response.context["messages"] if "The token for" in str(m)]
    secret = message.split("The token for alice is ")[1].split(" ")[0]
    assert token.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    entry = AuditEntry.objects.get(action=AuditAction.TOKEN_CREATE)
    assert entry.actor == admin_user and entry.details["owner"] == "alice"
    change_page = client.get(reverse("admin:jobs_apitoken_change", args=[token.pk]))
    assert secret not in change_page.content.decode()


def test_the_admin_revoke_action_needs_the_change_permission(client, alice, alice_secret):
    token = ApiToken.objects.get(user=alice)
    viewer = User.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_apitoken"))
    changelist = reverse("admin:jobs_apitoken_changelist")
    action = {"action": "revoke", "_selected_action": [token.pk]}

    client.force_login(viewer)
    client.post(changelist, action)
    assert ApiToken.objects.get(pk=token.pk).revoked_at is None

    viewer.user_permissions.add(Permission.objects.get(codename="change_apitoken"))
    client.post(changelist, action)
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None
