"""The dashboard, its live fragments and chart data; the admin index summary."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from jobs import heartbeat, redis
from jobs.admin.paginators import EstimatedCountPaginator
from jobs.models import Job
from jobs.selectors import stats


@pytest.fixture(autouse=True)
def _fresh_cache():
    # Aggregates are cached for a few seconds: each test starts from the database.
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def operator(db) -> User:
    user = User.objects.create_user("olga", password="olga-pass")
    user.user_permissions.add(Permission.objects.get(codename="view_all_jobs"))
    return user


def run(user, job_type, state, *, ago=60.0, wait=1.0, runtime=None, exc="", **fields) -> Job:
    """A run submitted ``ago`` seconds ago, started ``wait`` s later, ``runtime`` s long."""
    created = timezone.now() - timedelta(seconds=ago)
    started = created + timedelta(seconds=wait) if runtime is not None else None
    finished = started + timedelta(seconds=runtime) if started else None
    return Job.objects.create(
        id=str(uuid.uuid4()),
        job_type=job_type,
        task_name=job_type.task_name,
        submitted_by=user,
        state=state,
        created_at=created,
        started_at=started,
        finished_at=finished,
        exception_type=exc,
        error_message=f"{exc} happened" if exc else "",
        **fields,
    )


@pytest.fixture
def runs(alice, bob, job_types):
    flaky, primes = job_types["flaky"], job_types["count_primes"]
    made = [
        # alice: 3 succeeded, 2 failed (ValueError), 1 pending
        *(run(alice, primes, "SUCCESS", ago=120, runtime=r) for r in (1.0, 2.0, 3.0)),
        *(run(alice, flaky, "FAILURE", ago=300, runtime=0.5, exc="ValueError") for _ in "ab"),
        run(alice, flaky, "PENDING", ago=10),
        # bob: 1 succeeded 5 hours ago, 4 failed (KeyError), 1 started
        run(bob, primes, "SUCCESS", ago=5 * 3600, runtime=10.0),
        *(run(bob, flaky, "FAILURE", ago=200, runtime=0.2, exc="KeyError") for _ in "abcd"),
        run(bob, flaky, "STARTED", ago=30, wait=2, runtime=None),
        # finished three days ago: outside every window
        run(alice, primes, "SUCCESS", ago=3 * 86400, runtime=1.0),
    ]
    return made


def tiles(html: str) -> dict[str, int]:
    found = re.findall(r'data-state="(\w+)">\s*<span class="tile-count">(\d+)<', html)
    return {state: int(count) for state, count in found}


def failure_counts(html: str) -> dict[str, int]:
    pattern = r'<a class="mono"[^>]*>(\w+)</a></td>\s*<td class="num" data-count="(\d+)"'
    rows = re.findall(pattern, html)
    return {name: int(count) for name, count in rows}


def test_the_dashboard_is_the_home_page_after_login(client, alice):
    response = client.post(reverse("login"), {"username": "alice", "password": "alice-pass"})

    assert response.status_code == 302
    assert response["Location"] == reverse("jobs-dashboard") == "/"
    page = client.get("/").content.decode()
    assert "<h1>Dashboard</h1>" in page
    assert 'href="/runs/"' in page  # history moved under runs/


def test_an_operator_sees_everyones_numbers(client, operator, runs):
    client.force_login(operator)

    page = client.get(reverse("jobs-dashboard")).content.decode()

    counts = tiles(page)
    assert counts["SUCCESS"] == 4 and counts["FAILURE"] == 6
    assert counts["PENDING"] == 1 and counts["STARTED"] == 1 and counts["REVOKED"] == 0
    assert failure_counts(page) == {"KeyError": 4, "ValueError": 2}
    assert "Everyone's runs" in page
    assert f'href="{reverse("jobs-history")}?state=FAILURE"' in page


def test_a_submitter_sees_only_their_own_numbers(alice_client, runs):
    page = alice_client.get(reverse("jobs-dashboard")).content.decode()

    counts = tiles(page)
    assert counts["SUCCESS"] == 3 and counts["FAILURE"] == 2
    assert counts["PENDING"] == 1 and counts["STARTED"] == 0
    assert failure_counts(page) == {"ValueError": 2}
    assert "KeyError" not in page
    assert "Your runs" in page


def test_the_summary_fragment_refreshes_states_and_tables(alice_client, runs):
    response = alice_client.get(reverse("jobs-dashboard-summary"), headers={"HX-Request": "true"})

    html = response.content.decode()
    assert response.status_code == 200
    assert "<html" not in html
    assert tiles(html)["FAILURE"] == 2
    assert 'id="dash-tables" hx-swap-oob="true"' in html
    assert 'hx-trigger="every 5s"' in alice_client.get("/").content.decode()


def test_the_page_loads_workers_and_queues_lazily(alice_client):
    page = alice_client.get("/").content.decode()

    system_url = reverse("jobs-dashboard-system")
    assert f'hx-get="{system_url}" hx-trigger="load, every 5s"' in page
    assert 'id="queue-depths"' not in page  # not asked while the page renders


def test_the_system_fragment_shows_the_worker_queues_and_beat(worker, alice_client):
    heartbeat.beat_seen_now()

    html = alice_client.get(reverse("jobs-dashboard-system")).content.decode()

    assert f"test-{worker.broker}@" in html
    assert re.search(r'id="workers-online" data-count="[1-9]', html)
    for queue in ("default", "reports", "cpu"):
        assert f"<td>{queue}</td>" in html
    assert 'class="badge ok"' in html and " ago" in html


def test_the_system_fragment_warns_when_beat_was_never_seen(alice_client):

    redis.client().delete(heartbeat.BEAT_KEY)

    html = alice_client.get(reverse("jobs-dashboard-system")).content.decode()

    assert re.search(r'id="beat-last-seen">\s*<span class="badge bad">never', html)


def test_the_data_endpoint_returns_the_chart_series(client, operator, alice_client, runs):
    data = alice_client.get(reverse("jobs-dashboard-data")).json()

    minute, hour = data["minute"], data["hour"]
    assert len(minute["labels"]) == 60 and len(hour["labels"]) == 24
    assert sum(minute["series"]["succeeded"]) == 3  # alice's, all in the last hour
    assert sum(minute["series"]["failed"]) == 2
    assert sum(hour["series"]["succeeded"]) == 3
    assert data["states"]["FAILURE"] == 2

    client.force_login(operator)
    everyone = client.get(reverse("jobs-dashboard-data")).json()
    assert sum(everyone["minute"]["series"]["failed"]) == 6
    assert sum(everyone["minute"]["series"]["succeeded"]) == 3
    assert sum(everyone["hour"]["series"]["succeeded"]) == 4  # bob's, 5 hours ago, too


def test_percentiles_are_computed_in_the_database_and_match_the_python_fallback(alice, runs):
    timings = {t.name: t for t in stats.timings(user=alice)}

    primes = timings["Count primes"]
    assert primes.runs == 3  # runs started in the last 24 h
    assert primes.runtime_p50 == pytest.approx(2.0)
    assert primes.runtime_p95 == pytest.approx(2.9)  # percentile_cont: 2 + 0.9 * (3 - 2)
    assert primes.wait_p50 == pytest.approx(1.0)
    started = Job.objects.filter(created_at__gte=timezone.now() - timedelta(days=1))
    started = started.filter(started_at__isnull=False)
    in_database = sorted(stats._timings_in_database(started))
    in_python = sorted(stats._timings_from_sample(started))
    assert [row[:2] for row in in_database] == [row[:2] for row in in_python]
    for db_row, py_row in zip(in_database, in_python, strict=True):
        assert db_row[2:] == pytest.approx(py_row[2:])
    assert connection.vendor == "postgresql"


def test_every_dashboard_query_can_be_served_by_an_index(operator, alice, runs):
    with CaptureQueriesContext(connection) as queries:
        for user in (operator, alice):
            stats.runs_by_state(user=user)
            stats.throughput(user=user, period="minute")
            stats.throughput(user=user, period="hour")
            stats.timings(user=user)
            stats.failure_groups(user=user)
        stats.runs_by_type_and_state(since=timezone.now() - timedelta(days=1))
        stats.runtime_histogram(since=timezone.now() - timedelta(minutes=15), buckets=(1.0,))
    job_queries = [q["sql"] for q in queries if '"jobs_job"' in q["sql"]]

    assert len(job_queries) >= 14
    with connection.cursor() as cursor:
        # With sequential scans priced out, a plan that still scans the table has no index.
        cursor.execute("SET enable_seqscan = off")
        for sql in job_queries:
            cursor.execute("EXPLAIN " + sql)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert not re.search(r"Seq Scan on jobs_job\b", plan), plan
        cursor.execute("SET enable_seqscan = on")


def test_anonymous_visitors_are_sent_to_the_login_page(client):
    for name in ("jobs-dashboard", "jobs-dashboard-data", "jobs-dashboard-system"):
        response = client.get(reverse(name))
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))


def test_the_admin_index_shows_the_summary(admin_client, runs):
    html = admin_client.get(reverse("admin:index")).content.decode()

    assert "Jobsite now" in html
    counts = dict(re.findall(r'data-state="(\w+)">(\d+)</td>', html))
    assert counts["FAILURE"] == "6" and counts["SUCCESS"] == "4"
    assert 'id="admin-workers-online"' in html and 'id="admin-beat-last-seen"' in html
    assert f'href="{reverse("jobs-dashboard")}"' in html
    assert "Alert rules" in html  # AlertRule is registered


def test_admin_lists_of_runs_and_results_never_count_the_whole_table(admin_client, runs):
    for url in (
        reverse("admin:jobs_job_changelist"),
        reverse("admin:django_celery_results_taskresult_changelist"),
        reverse("admin:django_celery_results_groupresult_changelist"),
        reverse("admin:jobs_alert_changelist"),
    ):
        response = admin_client.get(url)
        assert response.status_code == 200, url
        assert isinstance(response.context["cl"].paginator, EstimatedCountPaginator)


def test_the_estimated_paginator_stops_counting_at_its_cap(runs, monkeypatch):
    monkeypatch.setattr(EstimatedCountPaginator, "CAP", 5)

    assert EstimatedCountPaginator(Job.objects.all(), 100).count >= 6
    assert EstimatedCountPaginator(Job.objects.filter(state="FAILURE"), 100).count == 6
    assert EstimatedCountPaginator(Job.objects.filter(state="SUCCESS"), 100).count == 5
