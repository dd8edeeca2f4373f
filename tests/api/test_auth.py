"""API authentication: tokens (Bearer or Token), revoked and inactive users, sessions + CSRF."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import pytest
from django.test import Client

from jobs import services
from jobs.models import ApiToken, Job
from tests.api.conftest import RUNS, VALID_PRIMES, ApiClient, body, catalog_job_type, make_run

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
