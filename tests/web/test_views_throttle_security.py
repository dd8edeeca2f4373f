"""The submit form is rate limited per user (with the API), and its ETA has a maximum."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from jobs import redis
from jobs.models import Job
from jobs.services.messages import THROTTLE_KEY

PRIMES = {"limit": "1000", "opt-queue": "cpu", "opt-priority": "5", "opt-max_retries": "0"}


@pytest.fixture(autouse=True)
def low_rate(settings):
    """A rate a test can reach, and no counts left from an earlier run (same user ids)."""
    settings.JOBSITE_SUBMIT_RATE = "2/min"
    client = redis.client()
    keys = [*client.scan_iter(THROTTLE_KEY + "*")]
    if keys:
        client.delete(*keys)


def test_submits_over_the_rate_are_refused_with_a_message_and_retry_after(alice_client, granted):
    url = reverse("jobs-submit", args=["count_primes"])
    answers = [alice_client.post(url, PRIMES) for _ in range(3)]

    assert [a.status_code for a in answers] == [302, 302, 429]
    refused = answers[2]
    assert 0 < int(refused["Retry-After"]) <= 60
    assert "Too many submits" in refused.content.decode()
    assert Job.objects.count() == 2


def test_the_form_and_the_api_share_one_budget(alice_client, granted):
    url = reverse("jobs-submit", args=["count_primes"])
    alice_client.post(url, PRIMES)
    alice_client.post(
        reverse("api-run-list"),
        {"job_type": "count_primes", "params": {"limit": 10}},
        content_type="application/json",
    )

    assert alice_client.post(url, PRIMES).status_code == 429


def test_showing_the_form_is_not_counted(alice_client, granted):
    url = reverse("jobs-submit", args=["count_primes"])
    for _ in range(3):
        assert alice_client.get(url).status_code == 200

    assert alice_client.post(url, PRIMES).status_code == 302


def test_a_run_at_too_far_ahead_is_a_field_error_and_stores_nothing(
    alice_client, granted, settings
):
    settings.JOBSITE_MAX_ETA_DAYS = 30
    late = (timezone.localtime() + timedelta(days=31)).strftime("%Y-%m-%dT%H:%M")

    answer = alice_client.post(
        reverse("jobs-submit", args=["count_primes"]), {**PRIMES, "opt-run_at": late}
    )

    assert answer.status_code == 400
    assert "A run may start at most" in answer.context["options_form"].errors["run_at"][0]
    assert not Job.objects.exists()
