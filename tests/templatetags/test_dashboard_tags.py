"""The admin index's summary (jobs.templatetags.dashboard_tags.jobsite_summary)."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse


@pytest.mark.broker
def test_the_admin_index_shows_the_summary(admin_client, runs):
    html = admin_client.get(reverse("admin:index")).content.decode()

    assert "Jobsite now" in html
    counts = dict(re.findall(r'data-state="(\w+)">(\d+)</td>', html))
    assert counts["FAILURE"] == "6" and counts["SUCCESS"] == "4"
    assert 'id="admin-workers-online"' in html and 'id="admin-beat-last-seen"' in html
    assert f'href="{reverse("jobs-dashboard")}"' in html
    assert "Alert rules" in html  # AlertRule is registered
