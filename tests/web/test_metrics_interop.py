"""/metrics against what other clients put on the broker: bounded labels, unknown counts."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from jobs.models import Job
from tests.conftest import BROKERS, _reachable, service_unavailable, use_broker

pytestmark = pytest.mark.broker


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


def families(admin_client) -> dict:
    response = admin_client.get("/metrics")
    assert response.status_code == 200, response.content[:500]
    return {f.name: f for f in text_string_to_metric_families(response.content.decode())}


def finished_run(task_name: str, job_type=None, *, runtime: float = 1.0) -> Job:
    now = timezone.now()
    return Job.objects.create(
        id=str(uuid.uuid4()),
        task_name=task_name,
        job_type=job_type,
        state="SUCCESS",
        created_at=now - timedelta(seconds=60),
        started_at=now - timedelta(seconds=30),
        finished_at=now - timedelta(seconds=30) + timedelta(seconds=runtime),
    )


def test_runs_of_tasks_outside_the_catalogue_share_one_other_label(admin_client, job_types):
    for number in range(5):  # five task names from the wire
        finished_run(f"somebody.elses.task_{number}", runtime=0.2)
    finished_run("jobs.count_primes", job_types["count_primes"], runtime=4.0)

    found = families(admin_client)

    runs = {
        (s.labels["job_type"], s.labels["state"]): s.value for s in found["jobsite_runs"].samples
    }
    assert runs == {("count_primes", "SUCCESS"): 1, ("other", "SUCCESS"): 5}
    buckets = {
        (s.labels["job_type"], s.labels["le"]): s.value
        for s in found["jobsite_run_duration_seconds"].samples
        if s.name == "jobsite_run_duration_seconds_bucket"
    }
    assert {job_type for job_type, _ in buckets} == {"count_primes", "other"}
    assert buckets[("other", "0.5")] == 5 and buckets[("other", "+Inf")] == 5
    assert buckets[("count_primes", "0.5")] == 0 and buckets[("count_primes", "5.0")] == 1


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_queue_consumers_are_reported_only_where_the_broker_counts_them(admin_client, broker):
    url = BROKERS[broker]
    if not _reachable(url):
        service_unavailable(f"{broker} is not reachable at {url}")
    use_broker(url)
    try:
        found = families(admin_client)
    finally:
        use_broker(BROKERS["redis"])

    messages = found["jobsite_queue_messages"].samples
    consumers = found["jobsite_queue_consumers"].samples
    assert messages, "queue depths are known on both brokers"
    if broker == "redis":  # Redis keeps no consumer count: unknown, so no sample (not 0)
        assert consumers == []
    else:
        assert {s.labels["queue"] for s in consumers} == {s.labels["queue"] for s in messages}
