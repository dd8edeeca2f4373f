"""The demo job types, with their parameter forms.

Each job is a plain function of its parameters; ``catalog.job`` makes it a Celery
task and a catalogue entry. Jobs report progress with ``report_progress`` and log
with the module logger: both show on the run's page.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import random
import time
from datetime import date, datetime, timedelta

from celery.exceptions import SoftTimeLimitExceeded
from django import forms
from django.core.mail import send_mail as django_send_mail
from django.utils import timezone

from jobs import catalog
from jobs.worker.task import report_progress, result_file_path

logger = logging.getLogger(__name__)


# --- Parameter forms --------------------------------------------------------------


class SendMailParams(forms.Form):
    to = forms.EmailField(label="To", help_text="Recipient address.")
    subject = forms.CharField(label="Subject", max_length=200)
    body = forms.CharField(
        label="Body", widget=forms.Textarea(attrs={"rows": 5}), max_length=20_000
    )


class ReportParams(forms.Form):
    REGIONS = [("emea", "EMEA"), ("amer", "Americas"), ("apac", "Asia-Pacific")]

    title = forms.CharField(label="Title", max_length=100, initial="Daily sales")
    region = forms.ChoiceField(label="Region", choices=REGIONS, initial="emea")
    days = forms.IntegerField(
        label="Days", min_value=1, max_value=366, initial=30, help_text="One CSV section per day."
    )
    rows_per_day = forms.IntegerField(
        label="Rows per day", min_value=1, max_value=10_000, initial=100
    )
    pace_ms = forms.IntegerField(
        label="Pause per day (ms)",
        min_value=0,
        max_value=5_000,
        initial=50,
        help_text="Slows the report down so its progress can be watched.",
    )


class PrimesParams(forms.Form):
    limit = forms.IntegerField(
        label="Count primes below",
        min_value=2,
        max_value=200_000_000,
        initial=5_000_000,
        help_text="A CPU-bound job: a segmented sieve that reports progress per segment.",
    )


class FlakyParams(forms.Form):
    MODES = [
        ("fail", "Fail at once (exception)"),
        ("until", "Fail until a time, then succeed (a dependency that is down)"),
        ("retry", "Fail N times, then succeed (needs max retries ≥ N)"),
        ("succeed", "Succeed"),
        ("crash", "Kill its worker process (a poison message)"),
    ]

    mode = forms.ChoiceField(label="Behaviour", choices=MODES, initial="retry")
    failures = forms.IntegerField(
        label="Failures before success", min_value=0, max_value=20, initial=2
    )
    message = forms.CharField(label="Error message", max_length=500, initial="Simulated failure")
    fail_until = forms.DateTimeField(
        label="Fail until",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="For “fail until”: runs before this time fail, later ones succeed.",
    )

    def clean(self):
        super().clean()
        data = self.cleaned_data
        if data.get("mode") == "until" and not data.get("fail_until"):
            self.add_error("fail_until", "Give the time until which the job fails.")
        return data


class SleepParams(forms.Form):
    seconds = forms.IntegerField(
        label="Seconds",
        min_value=1,
        max_value=86_400,
        initial=60,
        help_text="Reports progress every second.",
    )


class RotateCredentialsParams(forms.Form):
    service = forms.SlugField(label="Service", max_length=50, initial="billing-db")
    new_password = forms.CharField(
        label="New password",
        min_length=12,
        max_length=200,
        widget=forms.PasswordInput(render_value=True),
        help_text="Secret: masked on pages, in the API, in logs and in the audit record.",
    )


# --- Job types ----------------------------------------------------------------------


@catalog.job(
    name="jobs.send_mail",
    form=SendMailParams,
    title="Send mail",
    description="Sends one e-mail through Django's mail backend (Celery's classic first task).",
    queue="default",
    max_retries=3,
    guard=True,  # an e-mail must not go out twice when its message is delivered twice
)
def send_mail(self, *, to: str, subject: str, body: str) -> dict:
    logger.info("Sending mail to %s", to)
    sent = django_send_mail(subject, body, None, [to])
    logger.info("Mail sent (%d message)", sent)
    return {"to": to, "sent": sent}


@catalog.job(
    name="jobs.generate_report",
    form=ReportParams,
    title="Sales report (CSV)",
    description="Generates a CSV sales report, one section per day, with progress; "
    "the file is downloadable from the run.",
    queue="reports",
    queues=("reports", "default"),
    soft_time_limit=3600,
    time_limit=3700,
    guard=True,
)
def generate_report(
    self, *, title: str, region: str, days: int, rows_per_day: int, pace_ms: int = 0
) -> dict:
    rng = random.Random(f"{title}-{region}-{days}")
    path = result_file_path(f"{region}-report.csv")
    total = 0.0
    logger.info("Writing %s report for %s over %d days", title, region, days)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["date", "region", "order", "amount"])
        start = date.today() - timedelta(days=days)
        for day in range(days):
            for order in range(rows_per_day):
                amount = round(rng.lognormvariate(3, 1), 2)
                total += amount
                writer.writerow([start + timedelta(days=day), region, order + 1, amount])
            report_progress(day + 1, days, f"Day {day + 1} of {days}")
            if pace_ms:
                time.sleep(pace_ms / 1000)
    logger.info("Report done: %d rows, total %.2f", days * rows_per_day, total)
    return {"rows": days * rows_per_day, "total": round(total, 2), "file": path.name}


@catalog.job(
    name="jobs.count_primes",
    form=PrimesParams,
    title="Count primes",
    description="CPU-bound: counts the primes below a limit with a segmented sieve.",
    queue="cpu",
    queues=("cpu", "default"),
    soft_time_limit=600,
    time_limit=660,
)
def count_primes(self, *, limit: int) -> dict:
    segment = 1_000_000
    root = math.isqrt(limit) + 1
    base = small_primes(root)
    count = 0
    segments = math.ceil(limit / segment)
    try:
        for index in range(segments):
            low, high = index * segment, min(limit, (index + 1) * segment)
            count += count_segment(low, high, base)
            report_progress(index + 1, segments, f"Checked numbers below {high:,}")
    except SoftTimeLimitExceeded:
        logger.warning("Soft time limit reached; returning the partial count")
        return {"limit": limit, "primes": count, "partial": True, "checked_below": low}
    return {"limit": limit, "primes": count}


def small_primes(n: int) -> list[int]:
    sieve = bytearray([1]) * (n + 1)
    sieve[:2] = b"\x00\x00"
    for i in range(2, math.isqrt(n) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, n + 1, i)))
    return [i for i in range(n + 1) if sieve[i]]


def count_segment(low: int, high: int, base: list[int]) -> int:
    sieve = bytearray([1]) * (high - low)
    for p in base:
        if p * p >= high:
            break
        start = max(p * p, (low + p - 1) // p * p)
        sieve[start - low :: p] = bytearray(len(range(start, high, p)))
    for n in range(low, min(2, high)):
        sieve[n - low] = 0
    return sum(sieve)


class SimulatedFailure(Exception):
    """Raised on purpose by the flaky job."""


@catalog.job(
    name="jobs.flaky",
    form=FlakyParams,
    title="Flaky job",
    description="Fails on demand: at once, or a number of times before it succeeds "
    "(set max retries to at least that number).",
    queue="default",
    max_retries=3,
    retry_backoff=1,
    guard=True,
)
def flaky(self, *, mode: str, failures: int, message: str, fail_until: str | None = None) -> dict:
    attempt = self.request.retries
    logger.info("Attempt %d (mode %s)", attempt + 1, mode)
    if mode == "fail":
        raise SimulatedFailure(message)
    if mode == "crash":
        logger.error("Killing this worker process on purpose")
        os._exit(1)
    if mode == "until" and fail_until and timezone.now() < datetime.fromisoformat(fail_until):
        raise SimulatedFailure(f"{message} (until {fail_until})")
    if mode == "retry" and attempt < failures:
        logger.warning("Failing attempt %d of %d on purpose", attempt + 1, failures)
        self.retry_job(SimulatedFailure(f"{message} (attempt {attempt + 1})"))
    return {"attempts": attempt + 1}


@catalog.job(
    name="jobs.long_sleep",
    form=SleepParams,
    title="Long job",
    description="Waits, reporting progress every second; use it to try cancelling.",
    queue="default",
    guard=True,
)
def long_sleep(self, *, seconds: int) -> dict:
    for second in range(seconds):
        time.sleep(1)
        report_progress(second + 1, seconds, f"{second + 1} s of {seconds} s")
    return {"slept": seconds}


@catalog.job(
    name="jobs.rotate_credentials",
    form=RotateCredentialsParams,
    title="Rotate credentials",
    description="Stores a new password for a service (as a salted hash); the password is a "
    "secret parameter, masked everywhere it is shown.",
    queue="default",
    secret_fields=("new_password",),
    guard=True,
)
def rotate_credentials(self, *, service: str, new_password: str) -> dict:
    # Logging the secret by mistake is exactly what masking protects against.
    logger.info("Rotating %s to %s", service, new_password)
    salt = hashlib.sha256(self.request.id.encode()).hexdigest()[:16]
    digest = hashlib.pbkdf2_hmac("sha256", new_password.encode(), salt.encode(), 100_000)
    return {"service": service, "fingerprint": digest.hex()[:16]}
