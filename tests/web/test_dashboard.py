"""The dashboard, its live fragments and chart data (jobs.web.dashboard)."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from jobs import heartbeat, redis


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


@pytest.mark.broker
def test_the_system_fragment_shows_the_worker_queues_and_beat(worker, alice_client):
    heartbeat.beat_seen_now()

    html = alice_client.get(reverse("jobs-dashboard-system")).content.decode()

    assert f"test-{worker.broker}@" in html
    assert re.search(r'id="workers-online" data-count="[1-9]', html)
    for queue in ("default", "reports", "cpu"):
        assert f"<td>{queue}</td>" in html
    assert 'class="badge ok"' in html and " ago" in html


@pytest.mark.broker
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


def test_anonymous_visitors_are_sent_to_the_login_page(client):
    for name in ("jobs-dashboard", "jobs-dashboard-data", "jobs-dashboard-system"):
        response = client.get(reverse(name))
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))
