"""End to end, in a real browser: Chromium driven by Playwright against a live server,
a real Celery worker and a real Redis broker (one broker is enough here: the broker
matrix is covered by the other suites).

These tests also write the README's screenshots (docs/screenshots/*.png).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule
from playwright.sync_api import Browser, Page, expect, sync_playwright

from jobs import services
from jobs.models import Job
from jobs.roles import setup_roles
from tests.browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TIMEOUT_MS,
    VIEWPORT,
    csrf_headers,
    login,
    mark_window,
    screenshot,
    window_is_marked,
)
from tests.conftest import service_unavailable, wait_for

pytestmark = pytest.mark.broker

# --- Fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        service_unavailable(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    # Playwright's sync API keeps an asyncio loop running in this thread while the
    # browser is open, so Django would take every ORM call for one made from async
    # code. The loop is idle whenever the test body runs: the check does not apply.
    with pytest.MonkeyPatch.context() as patch, sync_playwright() as playwright:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server) -> Iterator[Page]:
    """A fresh browser context on the live server; fails on JS errors and broken assets."""
    context = browser.new_context(
        base_url=live_server.url, viewport=VIEWPORT, accept_downloads=True, locale="en-GB"
    )
    context.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"JS error: {error}"))
    page.on(
        "response",
        lambda r: (
            "/static/" in r.url and r.status >= 400 and problems.append(f"{r.status} {r.url}")
        ),
    )
    yield page
    context.close()
    assert not problems, problems


@pytest.fixture
def viewer(db) -> User:
    user = User.objects.create_user("vera", password="vera-pass")
    user.groups.add(setup_roles()["viewer"])
    return user


def state_badge(page: Page):
    return page.locator("#run-live .page-head .state")


def progress_value(page: Page) -> int:
    return int(page.locator("#run-progress").get_attribute("value") or 0)


def run_to_end(job_types, name: str, data: dict, user) -> Job:
    """A real run through the worker, submitted the way the form does it."""
    params, errors = job_types[name].spec.clean_params(data)
    assert not errors, errors
    job = services.job_submit(job_type=job_types[name], params=params, user=user)
    return wait_for(job.id)


# --- Tests ----------------------------------------------------------------------------


def test_pages_load_their_styles_and_scripts(page, alice, granted):
    login(page, "alice", "alice-pass")

    rules = page.evaluate("[...document.styleSheets].reduce((n, s) => n + s.cssRules.length, 0)")
    assert rules > 20  # jobsite.css was served and parsed
    assert page.evaluate("typeof htmx") == "object"
    assert page.locator(".topbar").evaluate("e => getComputedStyle(e).display") == "flex"


def test_a_job_submitted_from_its_form_updates_live_and_its_file_downloads(
    redis_worker, page, alice, granted
):
    login(page, "alice", "alice-pass")
    page.click("nav >> text=Submit")
    page.click("text=Sales report (CSV)")
    page.fill("#id_days", "0")
    page.click("button:has-text('Submit')")

    error = page.locator(".field.has-error", has=page.locator("#id_days"))
    expect(error).to_contain_text("greater than or equal to 1")
    assert not Job.objects.exists()
    screenshot(page, "submit-form-error")

    page.fill("#id_days", "30")
    page.fill("#id_rows_per_day", "20")
    page.fill("#id_pace_ms", "150")
    page.click("button:has-text('Submit')")
    expect(page.locator(".messages")).to_contain_text("Submitted")
    mark_window(page)
    # Mid-run: the bar has moved but the run is not done.
    page.wait_for_function(
        "() => { const p = document.querySelector('#run-progress');"
        " return p && p.value >= 3 && p.value < p.max; }"
    )
    first = progress_value(page)
    expect(state_badge(page)).to_have_text("In progress")
    screenshot(page, "run-progress")

    expect(state_badge(page)).to_have_text("Succeeded", timeout=60_000)
    assert progress_value(page) == 30 > first
    assert window_is_marked(page)  # updated in place: the page never reloaded
    with page.expect_download() as download_info:
        page.click("#download-result")
    download = download_info.value
    rows = list(csv.reader(download.path().open()))
    assert download.suggested_filename.endswith(".csv")
    assert rows[0] == ["date", "region", "order", "amount"]
    assert len(rows) == 1 + 30 * 20


def test_a_waiting_run_is_cancelled_and_a_running_one_terminated_from_their_pages(
    redis_worker, page, alice, granted
):
    login(page, "alice", "alice-pass")
    page.goto("/submit/long_sleep/")
    page.fill("#id_seconds", "60")
    page.click("summary:has-text('Advanced options')")
    page.fill("#id_opt-countdown", "600")  # it waits at the worker, not started
    page.click("button:has-text('Submit')")
    expect(state_badge(page)).to_have_text(re.compile("Pending|Received"))

    page.click("button:has-text('Cancel run')")
    expect(page.locator(".messages")).to_contain_text("Cancelled.")
    expect(state_badge(page)).to_have_text("Cancelled")
    cancelled = Job.objects.get()
    assert cancelled.state == "REVOKED" and cancelled.started_at is None

    page.goto("/submit/long_sleep/")
    page.fill("#id_seconds", "60")
    page.click("button:has-text('Submit')")
    expect(state_badge(page)).to_have_text("In progress")
    page.once("dialog", lambda dialog: dialog.accept())  # "Terminate this running job?"
    page.click("button:has-text('Terminate')")
    expect(page.locator(".messages")).to_contain_text("Termination requested")
    expect(state_badge(page)).to_have_text("Cancelled")
    running = Job.objects.exclude(pk=cancelled.pk).get()
    assert running.state == "REVOKED" and running.started_at is not None


def test_a_schedule_made_in_the_admin_shows_its_next_runs_and_runs_now(
    redis_worker, page, admin_user, job_types
):
    crontab = CrontabSchedule.objects.create(minute="30", hour="2", timezone="Europe/Berlin")
    login(page, "root", "root-pass")
    page.goto("/admin/django_celery_beat/periodictask/add/")
    page.fill("#id_name", "Nightly prime count")
    page.select_option("#id_job_type", label="Count primes")
    page.fill("#id_params-limit", "100000")  # the job type's own form, swapped in by htmx
    page.select_option("#id_crontab", str(crontab.pk))
    page.click("input[name=_continue]")

    expect(page.locator(".messagelist .success")).to_contain_text("was added successfully")
    next_runs = page.locator(".schedule-next-runs li")
    expect(next_runs).to_have_count(5)
    assert all(re.search(r", 02:30:00 CES?T$", text) for text in next_runs.all_inner_texts())
    expect(page.locator(".schedule-summary")).to_contain_text("Europe/Berlin")
    screenshot(page, "schedule-admin")

    page.click(".schedule-run-now button")
    sent = page.locator(".messagelist .success a[href^='/runs/']")
    expect(sent).to_have_count(1)
    job_id = sent.get_attribute("href").strip("/").split("/")[-1]
    assert wait_for(job_id).result == {"limit": 100000, "primes": 9592}
    page.goto("/runs/?schedule=Nightly+prime+count")
    row = page.locator("#history-rows tr", has=page.locator(f"a[href='/runs/{job_id}/']"))
    expect(row).to_contain_text("Count primes")
    expect(row).to_contain_text("Succeeded")


def test_a_schedules_history_shows_each_change_and_restores_a_version(page, admin_user, job_types):
    hourly = IntervalSchedule.objects.create(every=1, period="hours")
    login(page, "root", "root-pass")
    page.goto("/admin/django_celery_beat/periodictask/add/")
    page.fill("#id_name", "Hourly prime count")
    page.select_option("#id_job_type", label="Count primes")
    page.fill("#id_params-limit", "100000")
    page.select_option("#id_interval", str(hourly.pk))
    page.click("input[name=_continue]")
    expect(page.locator(".messagelist .success")).to_contain_text("was added successfully")
    page.fill("#id_params-limit", "250")
    page.fill("#id_priority", "9")
    page.click("input[name=_continue]")

    second = page.locator("#version-2")
    expect(second).to_contain_text("parameter limit")
    expect(second.locator(".diff-before")).to_contain_text(["100000", "5"])
    expect(second.locator(".diff-after")).to_contain_text(["250", "9"])
    page.locator("#version-1 button", has_text="Restore this version").click()

    expect(page.locator(".messagelist .success")).to_contain_text("as a new version")
    expect(page.locator("#version-3")).to_contain_text("Restore schedule version (v1)")
    expect(page.locator("#id_params-limit")).to_have_value("100000")
    page.locator("#versions").scroll_into_view_if_needed()
    screenshot(page, "schedule-versions")


def test_a_schedules_timeline_shows_late_and_missed_slots(page, admin_user, job_types):
    from tests.selectors.test_schedule_slots import cron, sent

    task = cron("0", "*", "Europe/Berlin")
    last = timezone.now().replace(minute=0, second=0, microsecond=0)
    for hours_ago in range(23, -1, -1):
        if hours_ago in (3, 9):
            continue  # missed
        late = timedelta(minutes=12) if hours_ago in (5, 14) else timedelta(seconds=2)
        sent(task, last - timedelta(hours=hours_ago) + late)
    sent(task, last - timedelta(hours=7) + timedelta(seconds=4))  # doubled
    login(page, "root", "root-pass")
    page.goto(f"/admin/django_celery_beat/periodictask/{task.pk}/change/")

    timeline = page.locator("#timeline")
    expect(timeline.locator(".slot-missed")).to_have_count(2)
    expect(timeline.locator(".slot-late").first).to_contain_text("late 12 min")
    expect(timeline.locator("h2")).to_contain_text("5 problems")
    timeline.scroll_into_view_if_needed()
    screenshot(page, "schedule-timeline")


def test_a_viewer_sees_no_actions_and_is_refused_when_posting_one(page, viewer, alice, granted):
    job = Job.objects.create(
        id="0f0f0f0f-1111-4222-8333-444444444444",
        task_name="jobs.count_primes",
        job_type=granted["count_primes"],
        submitted_by=alice,
        state="FAILURE",
    )
    login(page, "vera", "vera-pass")
    page.goto(f"/runs/{job.id}/")

    expect(state_badge(page)).to_have_text("Failed")  # she may see it...
    expect(page.locator("#run-actions")).to_have_count(0)  # ...and has no buttons
    expect(page.locator("#run-live button")).to_have_count(0)
    for action in ["retry", "delete", "cancel", "terminate"]:
        response = page.request.post(
            f"/runs/{job.id}/{action}", headers=csrf_headers(page), max_redirects=0
        )
        assert response.status == 403, (action, response.status)
        assert "CSRF verification failed" not in response.text()  # the permission check refused
    assert Job.objects.get(pk=job.id).state == "FAILURE"


def test_the_dashboard_charts_and_the_operator_pages_show_real_runs(
    redis_worker, page, admin_user, alice, granted
):
    for limit in (1000, 20000, 300000):
        assert run_to_end(granted, "count_primes", {"limit": limit}, alice).state == "SUCCESS"
    failed = run_to_end(
        granted,
        "flaky",
        {"mode": "fail", "failures": 0, "message": "Upstream API answered 503"},
        alice,
    )
    assert failed.state == "FAILURE"

    login(page, "root", "root-pass")
    expect(page.locator(".tile-success .tile-count")).to_have_text("3")
    expect(page.locator("#workers-online")).to_contain_text(redis_worker.name)
    page.wait_for_function("() => document.getElementById('dash-charts').dataset.updated")
    totals = page.evaluate(
        """() => ['chart-minute', 'chart-hour'].map(id => Chart.getChart(id).data.datasets
               .map(d => d.data.reduce((a, b) => a + b, 0)))"""
    )
    assert totals == [[3, 1, 0], [3, 1, 0]]  # succeeded, failed, cancelled/lost
    screenshot(page, "dashboard")

    page.goto(f"/runs/{failed.id}/")
    traceback = page.locator("#run-traceback")
    expect(traceback).to_contain_text("SimulatedFailure: Upstream API answered 503")
    page.locator(".card.failure").scroll_into_view_if_needed()
    screenshot(page, "run-traceback")

    page.goto("/runs/")
    page.select_option("#id_state", "SUCCESS")
    page.select_option("#id_job_type", "count_primes")
    page.fill("#id_submitted_by", "alice")
    page.click("button:has-text('Filter')")
    expect(page.locator("#history-rows tr")).to_have_count(3)
    expect(page.locator("#history-rows")).not_to_contain_text("Flaky job")
    screenshot(page, "history-filtered")

    page.click("nav >> text=Workers")
    expect(page.locator(".worker h2")).to_contain_text(redis_worker.name)
    screenshot(page, "workers")
    page.click("nav >> text=Queues")
    for queue in ("default", "reports", "cpu"):
        expect(page.locator(f"#queues-table tr[data-queue='{queue}']")).to_contain_text("Consuming")
    screenshot(page, "queues")


def test_a_workflow_started_from_its_form_shows_every_step_live(redis_worker, page, alice, granted):
    login(page, "alice", "alice-pass")
    page.click("nav >> text=Workflows")
    page.click("text=Primes in parallel, then sum")
    page.fill("#id_limit", "400000")
    page.fill("#id_parts", "4")
    page.click("button:has-text('Start workflow')")
    mark_window(page)

    total = page.locator(".wf-step", has_text="Sum the counts")
    expect(total.locator(".state")).to_have_text("Succeeded", timeout=60_000)
    expect(total.locator(".wf-result")).to_contain_text(re.compile(r"primes['\"]: 33860\b"))
    steps = page.locator("#workflow-tree .wf-step .state")
    expect(steps).to_have_count(5)
    assert set(steps.all_inner_texts()) == {"Succeeded"}
    assert window_is_marked(page)
    screenshot(page, "workflow")
