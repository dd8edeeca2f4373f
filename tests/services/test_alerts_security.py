"""Alerts: webhooks never reach internal addresses; a bad subject never silences e-mail."""

from __future__ import annotations

import socket
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import redis
from jobs.models import Alert, AlertRule, Job
from jobs.services.alerts import alerts_check


@pytest.fixture(autouse=True)
def _fresh_marks():
    """The failure mark, open incidents and the lock live in Redis, beyond the test DB."""
    client = redis.client()
    keys = [*client.scan_iter("jobsite:alerts:*")]
    if keys:
        client.delete(*keys)


def failed_run(job_type, *, message="disk full", seconds_ago=5) -> Job:
    now = timezone.now()
    return Job.objects.create(
        id=str(uuid.uuid4()),
        job_type=job_type,
        task_name=job_type.task_name,
        state="FAILURE",
        created_at=now - timedelta(seconds=seconds_ago + 1),
        started_at=now - timedelta(seconds=seconds_ago + 0.5),
        finished_at=now - timedelta(seconds=seconds_ago),
        exception_type="SimulatedFailure",
        error_message=message,
    )


def email_rule(job_type, **fields) -> AlertRule:
    defaults = {"name": "Mail", "job_type": job_type, "emails": "ops@example.com"}
    return AlertRule.objects.create(**{**defaults, "min_interval": 3600, **fields})


# --- E-mail subjects and folding (item 6) ------------------------------------------------


def test_an_error_with_newlines_still_sends_the_mail_with_a_one_line_subject(job_types, mailoutbox):
    email_rule(job_types["flaky"])
    failed_run(job_types["flaky"], message="line one\r\nBcc: victim@example.com\nline three")

    alerts_check()

    alert = Alert.objects.get()
    assert alert.email_sent and alert.error == ""
    assert len(mailoutbox) == 1
    subject = mailoutbox[0].subject
    assert "\n" not in subject and "\r" not in subject
    assert "line one Bcc: victim@example.com line three" in subject
    assert mailoutbox[0].bcc == []


def test_a_long_subject_is_capped(job_types, mailoutbox):
    email_rule(job_types["flaky"])
    failed_run(job_types["flaky"], message="x" * 5000)

    alerts_check()

    assert len(mailoutbox[0].subject) <= 300
    assert len(Alert.objects.get().subject) <= 300


def test_alerts_are_never_folded_into_one_that_was_not_delivered(job_types, mailoutbox, settings):
    rule = email_rule(job_types["flaky"])
    # A real SMTP connection to a port nobody listens on: the first mail fails.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", closed_port, 2
    failed_run(job_types["flaky"], seconds_ago=20)
    alerts_check()
    undelivered = Alert.objects.get()
    assert not undelivered.email_sent and undelivered.error.startswith("e-mail:")

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    failed_run(job_types["flaky"], seconds_ago=10)
    alerts_check()

    alerts = list(rule.alerts.order_by("created_at", "id"))
    assert len(alerts) == 2  # not folded into the one nobody received
    assert alerts[1].email_sent and len(mailoutbox) == 1
    assert alerts[1].payload["previous_undelivered"] == undelivered.pk
    assert "was not delivered" in mailoutbox[0].body

    failed_run(job_types["flaky"], seconds_ago=5)
    alerts_check()  # the last one was delivered: this one folds into it, as before

    assert rule.alerts.count() == 2 and len(mailoutbox) == 1
    assert rule.alerts.order_by("-created_at", "-id").first().suppressed == 1
