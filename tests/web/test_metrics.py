"""/metrics: Prometheus exposition of runs, runtimes, queues, workers and beat; access."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from jobs import heartbeat
from jobs.selectors import broker
from tests.conftest import run

URL = "/metrics"


@pytest.fixture
def runs(alice, bob, job_types):
    flaky, primes = job_types["flaky"], job_types["count_primes"]
    return [
        run(alice, primes, "SUCCESS", ago=60, runtime=0.3),
        run(alice, primes, "SUCCESS", ago=60, runtime=4.0),
        run(bob, primes, "SUCCESS", ago=60, runtime=120.0),
        run(bob, flaky, "FAILURE", ago=60, runtime=0.05, exc="KeyError"),
        run(bob, flaky, "FAILURE", ago=60, runtime=0.05, exc="KeyError"),
        run(alice, flaky, "PENDING", ago=5),
        run(alice, flaky, "SUCCESS", ago=2 * 86400, runtime=1.0),  # outside the 24 h window
    ]


def families(response) -> dict:
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(response.content.decode())}


def samples(family, name: str | None = None) -> dict:
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in family.samples
        if name is None or s.name == name
    }


@pytest.mark.broker
def test_metrics_expose_runs_runtimes_queues_workers_and_beat(redis_worker, admin_client, runs):
    heartbeat.beat_seen_now()

    found = families(admin_client.get(URL))

    runs_family = found["jobsite_runs"]
    assert runs_family.type == "gauge"
    by_labels = samples(runs_family)
    assert by_labels[(("job_type", "count_primes"), ("state", "SUCCESS"))] == 3
    assert by_labels[(("job_type", "flaky"), ("state", "FAILURE"))] == 2
    assert by_labels[(("job_type", "flaky"), ("state", "PENDING"))] == 1
    assert (("job_type", "flaky"), ("state", "SUCCESS")) not in by_labels

    histogram = found["jobsite_run_duration_seconds"]
    assert histogram.type == "histogram"
    buckets = samples(histogram, "jobsite_run_duration_seconds_bucket")
    primes = {
        dict(labels)["le"]: v
        for labels, v in buckets.items()
        if ("job_type", "count_primes") in labels
    }
    assert primes["0.5"] == 1 and primes["5.0"] == 2 and primes["60.0"] == 2
    assert primes["300.0"] == 3 and primes["+Inf"] == 3

    queues = samples(found["jobsite_queue_messages"])
    assert {dict(labels)["queue"] for labels in queues} == set(broker.queue_names())
    assert "jobsite_queue_consumers" in found
    assert found["jobsite_workers_online"].samples[0].value >= 1  # the test's worker answers
    beat = found["jobsite_beat_last_seen_timestamp_seconds"].samples[0].value
    assert beat == pytest.approx(heartbeat.beat_last_seen().timestamp())


@pytest.mark.broker
def test_metrics_speak_openmetrics_when_the_scraper_asks(admin_client, runs):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse

    response = admin_client.get(URL, headers={"Accept": "application/openmetrics-text"})

    assert response["Content-Type"].startswith("application/openmetrics-text")
    found = {f.name: f for f in parse(response.content.decode())}
    assert found["jobsite_run_duration_seconds"].type == "gaugehistogram"
    assert found["jobsite_runs"].type == "gauge"


def test_metrics_refuse_anonymous_clients_without_a_token(client, runs):
    response = client.get(URL)

    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"jobsite_runs" not in response.content


def test_metrics_refuse_logged_in_users_who_are_not_staff(alice_client):
    assert alice_client.get(URL).status_code == 403


@pytest.mark.broker
def test_metrics_accept_the_bearer_token_and_refuse_a_wrong_one(client, runs, settings):
    settings.JOBSITE_METRICS_TOKEN = "scrape-me-" + "x" * 30

    good = client.get(URL, headers={"Authorization": f"Bearer {settings.JOBSITE_METRICS_TOKEN}"})
    wrong = client.get(URL, headers={"Authorization": "Bearer not-the-token"})
    basic = client.get(URL, headers={"Authorization": "Basic c2NyYXBlOm1l"})

    assert "jobsite_runs" in families(good)
    assert wrong.status_code == 403 and basic.status_code == 403


def test_a_token_header_is_refused_when_no_token_is_configured(client, settings):
    settings.JOBSITE_METRICS_TOKEN = ""

    response = client.get(URL, headers={"Authorization": "Bearer "})

    assert response.status_code == 403


@pytest.mark.broker
def test_metrics_accept_clients_from_allowed_networks(client, runs, settings):
    settings.JOBSITE_METRICS_ALLOW = ["10.0.0.0/8", "192.0.2.7"]

    inside = client.get(URL, REMOTE_ADDR="10.20.30.40")
    exact = client.get(URL, REMOTE_ADDR="192.0.2.7")
    outside = client.get(URL, REMOTE_ADDR="192.0.2.8")

    assert "jobsite_runs" in families(inside)
    assert exact.status_code == 200
    assert outside.status_code == 401


def test_the_metrics_url_is_the_root_metrics_path():
    assert reverse("jobs-metrics") == URL


FLEET_DOC = Path(__file__).resolve().parents[2] / "docs" / "fleet.md"


@pytest.mark.broker
def test_the_keda_example_in_docs_scales_on_a_queue_depth_metrics_exports(admin_client):
    """docs/fleet.md's ScaledObject queries jobsite_queue_messages for a queue we have."""
    query = re.search(r"query: sum\((\w+)\{queue=\"(\w+)\"\}\)", FLEET_DOC.read_text())
    assert query, "docs/fleet.md has no prometheus query on a queue"
    metric, queue = query.groups()

    found = families(admin_client.get(URL))

    assert found[metric].type == "gauge"
    depths = {dict(labels)["queue"]: value for labels, value in samples(found[metric]).items()}
    assert depths[queue] >= 0
