"""API submits are rate limited per user, and a run may not be put off without bound."""

from __future__ import annotations

import json
import socket
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from jobs import redis
from jobs.models import Job
from jobs.services.messages import THROTTLE_KEY


@pytest.fixture(autouse=True)
def low_rate(settings):
    """A rate a test can reach, and no counts left from an earlier run (same user ids)."""
    settings.JOBSITE_SUBMIT_RATE = "2/min"
    client = redis.client()
    keys = [*client.scan_iter(THROTTLE_KEY + "*")]
    if keys:
        client.delete(*keys)


def post(client, url: str, body: dict):
    return client.post(url, json.dumps(body), content_type="application/json")


def one(options: dict | None = None) -> dict:
    return {"job_type": "count_primes", "params": {"limit": 10}, "options": options or {}}


def test_single_submits_over_the_rate_are_a_429_with_retry_after(alice_client, granted):
    url = reverse("api-run-list")
    answers = [post(alice_client, url, one()) for _ in range(3)]

    assert [a.status_code for a in answers] == [201, 201, 429]
    refused = answers[2]
    assert 0 < int(refused["Retry-After"]) <= 60
    assert "Too many submits" in refused.json()["detail"]
    assert Job.objects.count() == 2  # the refused one stored nothing


def test_a_bulk_request_counts_once_against_the_same_budget(alice_client, granted):
    bulk = {"runs": [one(), one(), one()]}

    first = post(alice_client, reverse("api-run-bulk"), bulk)
    second = post(alice_client, reverse("api-run-list"), one())
    third = post(alice_client, reverse("api-run-bulk"), bulk)

    assert (first.status_code, second.status_code, third.status_code) == (201, 201, 429)
    assert Job.objects.count() == 4


def test_the_budget_is_per_user(alice_client, granted, bob, client):
    url = reverse("api-run-list")
    for _ in range(2):
        post(alice_client, url, one())
    client.force_login(bob)

    assert post(client, url, one()).status_code == 201


def test_reading_runs_is_not_counted(alice_client, granted):
    for _ in range(3):
        assert alice_client.get(reverse("api-run-list")).status_code == 200

    assert post(alice_client, reverse("api-run-list"), one()).status_code == 201


def test_a_run_at_beyond_the_maximum_eta_is_a_field_error(alice_client, granted, settings):
    settings.JOBSITE_MAX_ETA_DAYS = 30
    late = (timezone.now() + timedelta(days=31)).isoformat()

    answer = post(alice_client, reverse("api-run-list"), one({"run_at": late}))

    assert answer.status_code == 400
    assert "at most" in " ".join(answer.json()["options"]["run_at"])
    assert not Job.objects.exists()


def test_a_countdown_beyond_the_maximum_eta_is_a_field_error(alice_client, granted, settings):
    settings.JOBSITE_MAX_ETA_DAYS = 1

    answer = post(alice_client, reverse("api-run-list"), one({"countdown": 2 * 86_400}))

    assert answer.status_code == 400
    assert "countdown" in answer.json()["options"]


def test_the_counts_live_in_jobsites_redis_shared_by_every_web_process(
    alice_client, alice, granted
):
    url = reverse("api-run-list")
    post(alice_client, url, one())
    post(alice_client, url, one())

    assert redis.client().zcard(f"{THROTTLE_KEY}{alice.pk}") == 2
    assert 0 < redis.client().ttl(f"{THROTTLE_KEY}{alice.pk}") <= 60


@pytest.fixture
def redis_down(settings):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        settings.JOBSITE_REDIS_URL = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    redis.client.cache_clear()
    yield
    redis.client.cache_clear()


def test_when_jobsites_redis_is_down_submits_still_go_through(alice_client, granted, redis_down):
    url = reverse("api-run-list")

    answers = [post(alice_client, url, one()).status_code for _ in range(3)]

    assert answers == [201, 201, 201]
