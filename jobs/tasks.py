"""The job types people can run, and Jobsite's own maintenance tasks.

Each job is a plain function of its parameters; ``catalog.job`` makes it a Celery
task and a catalogue entry. Jobs report progress with ``report_progress`` and log
with the module logger: both show on the run's page.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from datetime import date, timedelta

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.core.mail import send_mail as django_send_mail

from jobs import catalog
from jobs.forms import FlakyParams, PrimesParams, ReportParams, SendMailParams, SleepParams
from jobs.tracking import report_progress, result_file_path

logger = logging.getLogger(__name__)


@catalog.job(
    form=SendMailParams,
    title="Send mail",
    description="Sends one e-mail through Django's mail backend (Celery's classic first task).",
    queue="default",
    max_retries=3,
)
def send_mail(self, *, to: str, subject: str, body: str) -> dict:
    logger.info("Sending mail to %s", to)
    sent = django_send_mail(subject, body, None, [to])
    logger.info("Mail sent (%d message)", sent)
    return {"to": to, "sent": sent}


@catalog.job(
    form=ReportParams,
    title="Sales report (CSV)",
    description="Generates a CSV sales report, one section per day, with progress; "
    "the file is downloadable from the run.",
    queue="reports",
    queues=("reports", "default"),
    soft_time_limit=3600,
    time_limit=3700,
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
    base = _small_primes(root)
    count = 0
    segments = math.ceil(limit / segment)
    try:
        for index in range(segments):
            low, high = index * segment, min(limit, (index + 1) * segment)
            count += _count_segment(low, high, base)
            report_progress(index + 1, segments, f"Checked numbers below {high:,}")
    except SoftTimeLimitExceeded:
        logger.warning("Soft time limit reached; returning the partial count")
        return {"limit": limit, "primes": count, "partial": True, "checked_below": low}
    return {"limit": limit, "primes": count}


def _small_primes(n: int) -> list[int]:
    sieve = bytearray([1]) * (n + 1)
    sieve[:2] = b"\x00\x00"
    for i in range(2, math.isqrt(n) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, n + 1, i)))
    return [i for i in range(n + 1) if sieve[i]]


def _count_segment(low: int, high: int, base: list[int]) -> int:
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
    form=FlakyParams,
    title="Flaky job",
    description="Fails on demand: at once, or a number of times before it succeeds "
    "(set max retries to at least that number).",
    queue="default",
    max_retries=3,
    retry_backoff=1,
)
def flaky(self, *, mode: str, failures: int, message: str) -> dict:
    attempt = self.request.retries
    logger.info("Attempt %d (mode %s)", attempt + 1, mode)
    if mode == "fail":
        raise SimulatedFailure(message)
    if mode == "retry" and attempt < failures:
        logger.warning("Failing attempt %d of %d on purpose", attempt + 1, failures)
        self.retry_job(SimulatedFailure(f"{message} (attempt {attempt + 1})"))
    return {"attempts": attempt + 1}


@catalog.job(
    form=SleepParams,
    title="Long job",
    description="Waits, reporting progress every second; use it to try cancelling.",
    queue="default",
)
def long_sleep(self, *, seconds: int) -> dict:
    for second in range(seconds):
        time.sleep(1)
        report_progress(second + 1, seconds, f"{second + 1} s of {seconds} s")
    return {"slept": seconds}


# --- Maintenance (not job types: named jobsite.*, never shown as runs) ------------


@shared_task(name="jobsite.terminate_followup", ignore_result=True)
def terminate_followup(job_id: str) -> None:
    """SIGKILL a terminated run that did not stop within its grace period."""
    from jobs.models import FINISHED_STATES, Job

    state = Job.objects.filter(pk=job_id).values_list("state", flat=True).first()
    if state is not None and state not in FINISHED_STATES:
        logger.warning("Run %s ignored SIGTERM; sending SIGKILL", job_id)
        terminate_followup.app.control.revoke(job_id, terminate=True, signal="SIGKILL")
