"""Alerts: a run failing for good, a missed schedule, silent beat; e-mail and signed webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.management import call_command
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from jobs import heartbeat, redis
from jobs.models import Alert, AlertRule, Job, JobSource
from jobs.services import alerts
from jobs.services.alerts import alerts_check
from tests.conftest import wait_for
from tests.worker.test_tracking import submit

SECRET = "webhook-secret-for-tests"


@pytest.fixture(autouse=True)
def _fresh_marks():
    """The failure mark, open incidents and the lock live in Redis, beyond the test DB."""
    client = redis.client()
    keys = [*client.scan_iter("jobsite:alerts:*")]
    if keys:
        client.delete(*keys)
    yield


@pytest.fixture(autouse=True)
def _local_webhooks(settings):
    """The test webhooks listen on 127.0.0.1: refused unless allowed (see the SSRF tests)."""
    settings.JOBSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]


class Webhook:
    """A real HTTP server on 127.0.0.1 that records the POSTs it receives."""

    def __init__(self) -> None:
        self.status = 200
        self.requests: list[tuple[dict, bytes]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests.append((dict(self.headers), body))
                self.send_response(hook.status)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def fast_retries(settings):
    settings.JOBSITE_ALERT_WEBHOOK_BACKOFF = 0.01
    return settings


def rule_for(job_type, webhook=None, **fields) -> AlertRule:
    defaults = {
        "name": "Flaky failures",
        "job_type": job_type,
        "emails": "ops@example.com, oncall@example.com",
        "webhook_url": webhook.url if webhook else "",
        "webhook_secret": SECRET,
        "min_interval": 3600,
    }
    return AlertRule.objects.create(**{**defaults, **fields})


def failed_run(job_type, *, state="FAILURE", seconds_ago=5) -> Job:
    now = timezone.now()
    return Job.objects.create(
        id=str(uuid.uuid4()),
        job_type=job_type,
        task_name=job_type.task_name,
        state=state,
        created_at=now - timedelta(seconds=seconds_ago + 1),
        started_at=now - timedelta(seconds=seconds_ago + 0.5),
        finished_at=now - timedelta(seconds=seconds_ago) if state == "FAILURE" else None,
        exception_type="SimulatedFailure",
        error_message="disk full",
    )


def valid_signature(headers: dict, body: bytes) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Jobsite-Signature"], expected)


FAIL = {"mode": "fail", "failures": "0", "opt-queue": "default"}


@pytest.mark.broker
def test_a_failing_job_sends_one_email_and_one_signed_webhook_then_folds_the_next(
    worker, alice_client, granted, webhook, mailoutbox
):
    rule = rule_for(granted["flaky"], webhook)
    first = wait_for(submit(alice_client, "flaky", {**FAIL, "message": "disk full"}).id)
    assert first.state == "FAILURE"

    alerts_check()

    assert len(mailoutbox) == 1
    mail = mailoutbox[0]
    assert mail.to == ["ops@example.com", "oncall@example.com"]
    assert "Flaky job failed: SimulatedFailure: disk full" in mail.subject
    assert first.pk in mail.body
    assert len(webhook.requests) == 1
    headers, body = webhook.requests[0]
    assert valid_signature(headers, body)
    assert headers["Content-Type"] == "application/json"
    payload = json.loads(body)
    assert payload["kind"] == "run_failed" and payload["run"]["id"] == first.pk
    assert payload["run"]["exception_type"] == "SimulatedFailure"
    alert = Alert.objects.get()
    assert (alert.rule, alert.job_id, alert.email_sent) == (rule, first.pk, True)
    assert alert.webhook_status == "200" and alert.error == "" and alert.suppressed == 0

    second = wait_for(submit(alice_client, "flaky", {**FAIL, "message": "disk full again"}).id)
    assert second.state == "FAILURE"
    alerts_check()
    alerts_check()  # nothing new: each failure is counted once

    assert len(mailoutbox) == 1 and len(webhook.requests) == 1
    alert.refresh_from_db()
    assert Alert.objects.count() == 1 and alert.suppressed == 1


def test_a_webhook_answering_500_is_retried_a_bounded_number_of_times(
    job_types, webhook, fast_retries, mailoutbox
):
    webhook.status = 500
    rule_for(job_types["flaky"], webhook, emails="")
    failed_run(job_types["flaky"])

    result = alerts_check()

    assert result.raised == 1
    assert len(webhook.requests) == fast_retries.JOBSITE_ALERT_WEBHOOK_ATTEMPTS == 3
    assert all(valid_signature(headers, body) for headers, body in webhook.requests)
    alert = Alert.objects.get()
    assert alert.webhook_status == "500 after 3 attempts"
    assert "HTTP 500" in alert.error
    assert not alert.email_sent and mailoutbox == []


def test_a_webhook_answering_400_is_not_retried(job_types, webhook, fast_retries):
    webhook.status = 400
    rule_for(job_types["flaky"], webhook, emails="")
    failed_run(job_types["flaky"])

    alerts_check()

    assert len(webhook.requests) == 1
    assert Alert.objects.get().webhook_status == "400"


def test_an_unreachable_webhook_is_recorded_as_such(job_types, fast_retries):
    hook = Webhook()
    url = hook.url
    hook.close()  # nothing listens on that port any more
    rule = rule_for(job_types["flaky"], emails="")
    rule.webhook_url = url
    rule.save()
    failed_run(job_types["flaky"])

    alerts_check()

    alert = Alert.objects.get()
    assert alert.webhook_status == "unreachable after 3 attempts"
    assert alert.error.startswith("webhook:")


def test_a_retrying_run_is_not_alerted_until_it_fails_for_good(job_types, mailoutbox):
    rule_for(job_types["flaky"])
    job = failed_run(job_types["flaky"], state="RETRY")

    alerts_check()
    assert mailoutbox == []

    Job.objects.filter(pk=job.pk).update(state="FAILURE", finished_at=timezone.now())
    alerts_check()
    alerts_check()

    assert len(mailoutbox) == 1
    assert Alert.objects.get().job_id == job.pk


def test_rules_for_another_job_type_stay_quiet_and_catch_all_rules_fire(job_types, mailoutbox):
    rule_for(job_types["count_primes"], name="Primes only", emails="primes@example.com")
    rule_for(None, name="Everything", emails="all@example.com")
    failed_run(job_types["flaky"])

    alerts_check()

    assert [m.to for m in mailoutbox] == [["all@example.com"]]


def test_a_rule_alerts_again_once_its_interval_has_passed(job_types, mailoutbox):
    rule = rule_for(job_types["flaky"], min_interval=60)
    failed_run(job_types["flaky"], seconds_ago=30)
    alerts_check()
    failed_run(job_types["flaky"], seconds_ago=20)
    alerts_check()  # folded
    failed_run(job_types["flaky"], seconds_ago=10)

    alerts_check(now=timezone.now() + timedelta(seconds=90))

    assert len(mailoutbox) == 2
    latest = rule.alerts.order_by("-created_at").first()
    assert latest.payload["folded_into_previous"] == 1
    assert "1 similar alert(s) were folded" in mailoutbox[1].body


def test_a_missed_schedule_alerts_once_until_it_runs_again(job_types, mailoutbox):
    every_minute = IntervalSchedule.objects.create(every=60, period=IntervalSchedule.SECONDS)
    task = PeriodicTask.objects.create(
        name="Nightly primes",
        task=job_types["count_primes"].task_name,
        interval=every_minute,
        kwargs=json.dumps({"limit": 100}),
        last_run_at=timezone.now() - timedelta(minutes=10),
    )
    rule_for(None, name="Schedules", on_failure=False, on_schedule_missed=True, min_interval=0)

    alerts_check()
    alerts_check()  # still late: the same incident, not a new alert

    assert len(mailoutbox) == 1
    assert "“Nightly primes” missed its run" in mailoutbox[0].subject
    assert Alert.objects.get().kind == "schedule_missed"

    PeriodicTask.objects.filter(pk=task.pk).update(last_run_at=timezone.now())
    alerts_check()  # on time again: the incident closes
    PeriodicTask.objects.filter(pk=task.pk).update(
        last_run_at=timezone.now() - timedelta(minutes=10)
    )
    alerts_check()

    assert len(mailoutbox) == 2


def test_a_schedule_on_time_raises_nothing(job_types, mailoutbox):
    every_hour = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.HOURS)
    PeriodicTask.objects.create(
        name="Hourly",
        task=job_types["count_primes"].task_name,
        interval=every_hour,
        last_run_at=timezone.now() - timedelta(minutes=30),
    )
    rule_for(None, name="Schedules", on_failure=False, on_schedule_missed=True)

    alerts_check()

    assert mailoutbox == []


@pytest.mark.broker
def test_silent_beat_alerts_once_and_clears_when_it_ticks(job_types, mailoutbox):
    redis.client().delete(heartbeat.BEAT_KEY)
    rule_for(None, name="Heartbeat", on_failure=False, on_heartbeat_lost=True, min_interval=0)

    alerts_check()
    alerts_check()

    beat_mails = [m for m in mailoutbox if "Beat is silent" in m.subject]
    assert len(beat_mails) == 1 and "never seen" in beat_mails[0].subject
    heartbeat.beat_seen_now()
    alerts_check()
    assert not redis.client().exists(alerts.OPEN_KEY + "beat")


def test_the_management_command_runs_one_check(job_types, mailoutbox, capsys):
    rule_for(job_types["flaky"])
    failed_run(job_types["flaky"])

    call_command("alerts_check")

    assert "1 new failed run(s); 1 alert(s) sent, 0 folded" in capsys.readouterr().out
    assert len(mailoutbox) == 1


def test_a_check_already_running_makes_another_skip(job_types):
    lock = redis.client().lock(alerts.LOCK_KEY, timeout=30)
    assert lock.acquire(blocking=False)
    try:
        assert alerts_check().skipped
    finally:
        lock.release()


def test_the_check_is_a_maintenance_task_that_beat_installs(db, settings):
    from django_celery_beat.schedulers import ModelEntry

    from jobs.tasks.maintenance import alerts_check as task
    from jobsite.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["jobsite-alerts-check"]
    # What DatabaseScheduler does with CELERY_BEAT_SCHEDULE when beat starts.
    ModelEntry.from_entry("jobsite-alerts-check", app=app, **entry)

    stored = PeriodicTask.objects.get(name="jobsite-alerts-check")
    assert stored.task == task.name == "jobsite.alerts_check" and task.ignore_result
    assert stored.enabled and stored.queue == "default" and stored.expire_seconds == 60
    assert stored.interval.every == 60 and stored.interval.period == IntervalSchedule.SECONDS


def _beat_run(task, at):
    job = Job.objects.create(
        id=f"beat-{at.timestamp()}-{task.pk}", task_name=task.task, schedule=task,
        schedule_name=task.name, source=JobSource.BEAT,
    )  # fmt: skip
    Job.objects.filter(pk=job.pk).update(created_at=at)


def test_a_doubled_slot_and_a_missed_one_raise_the_missed_schedule_alert_once_each(
    job_types, mailoutbox
):
    from django_celery_beat.models import CrontabSchedule

    now = timezone.now()
    hour = now.replace(minute=0, second=0, microsecond=0)
    every_10 = CrontabSchedule.objects.create(minute="*/10", hour="*", timezone="UTC")
    task = PeriodicTask.objects.create(
        name="Every ten", task=job_types["count_primes"].task_name, crontab=every_10,
        last_run_at=now,  # beat thinks it is on time: only the slots tell
    )  # fmt: skip
    missed, doubled = hour - timedelta(minutes=30), hour - timedelta(minutes=50)
    at = hour - timedelta(hours=3)
    while at <= now:
        if at != missed:
            _beat_run(task, at + timedelta(seconds=1))
        at += timedelta(minutes=10)
    _beat_run(task, doubled + timedelta(seconds=3))  # a second run for the same slot
    rule_for(None, name="Schedules", on_failure=False, on_schedule_missed=True, min_interval=0)

    alerts_check()
    alerts_check()  # the same slots again: no new alert

    subjects = sorted(m.subject for m in mailoutbox)
    assert len(subjects) == 2, subjects
    assert any("missed its run at" in s and f"{missed:%H:%M}" in s for s in subjects)
    assert any("ran twice at" in s and f"{doubled:%H:%M}" in s for s in subjects)
    assert {a.kind for a in Alert.objects.all()} == {"schedule_missed"}
