"""The job types people can run, and Jobsite's own maintenance tasks.

Each job is a plain function of its parameters; ``catalog.job`` makes it a Celery
task and a catalogue entry. Jobs report progress with ``report_progress`` and log
with the module logger: both show on the run's page.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import math
import os
import random
import time
from datetime import date, datetime, timedelta

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.core.mail import send_mail as django_send_mail
from django.utils import timezone

from jobs import catalog
from jobs.forms import (
    FlakyParams,
    PrimesParams,
    ReportParams,
    RotateCredentialsParams,
    SendMailParams,
    SleepParams,
)
from jobs.tracking import report_progress, result_file_path

logger = logging.getLogger(__name__)


@catalog.job(
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


# --- Workflow steps and routing demos -------------------------------------------
# Steps that take the previous step's result (a chain passes it as the first
# positional argument; a chord passes the list of its header's results), the
# workflows' errback, and job types that show the topic, fanout and headers routes.

from django import forms  # noqa: E402  (kept inside this block: the forms live with their jobs)


class PrimesRangeParams(forms.Form):
    low = forms.IntegerField(label="From", min_value=0, max_value=200_000_000, initial=0)
    high = forms.IntegerField(label="Below", min_value=1, max_value=200_000_000, initial=1_000_000)

    def clean(self):
        data = super().clean()
        low, high = data.get("low"), data.get("high")
        if low is not None and high is not None and low >= high:
            self.add_error("high", "Must be greater than “From”.")
        return data


class SumResultsParams(forms.Form):
    field = forms.SlugField(
        label="Field to add up", max_length=50, initial="primes",
        help_text="The key of each previous result that is summed.",
    )  # fmt: skip


class MailSummaryParams(forms.Form):
    to = forms.EmailField(label="To")
    subject = forms.CharField(label="Subject", max_length=200, initial="Your report")


class WorkflowFailedParams(forms.Form):
    workflow_id = forms.CharField(label="Workflow", max_length=255)


class RegionalReportParams(forms.Form):
    kind = forms.ChoiceField(
        label="Kind", choices=[("daily", "Daily"), ("weekly", "Weekly")], initial="daily"
    )
    region = forms.ChoiceField(label="Region", choices=ReportParams.REGIONS, initial="emea")
    rows = forms.IntegerField(label="Rows", min_value=1, max_value=100_000, initial=1000)


class ClearCachesParams(forms.Form):
    reason = forms.CharField(label="Reason", max_length=200, initial="Configuration changed")


class CapabilityParams(forms.Form):
    gpu = forms.BooleanField(label="Needs a GPU", required=False, initial=True)
    region = forms.ChoiceField(label="Data region", choices=ReportParams.REGIONS, initial="emea")
    lane = forms.ChoiceField(
        label="Lane", choices=[("standard", "Standard"), ("express", "Express")]
    )


@catalog.job(
    form=PrimesRangeParams,
    title="Count primes in a range",
    description="Counts the primes in [from, below): one slice of a parallel count.",
    queue="cpu",
    queues=("cpu", "default"),
    soft_time_limit=600,
    time_limit=660,
)
def count_primes_range(self, *, low: int, high: int) -> dict:
    base = _small_primes(math.isqrt(high) + 1)
    segment = 1_000_000
    count, start = 0, low
    try:
        while start < high:
            end = min(high, start + segment)
            count += _count_segment(start, end, base)
            report_progress(end - low, high - low, f"Checked numbers below {end:,}")
            start = end
    except SoftTimeLimitExceeded:
        logger.warning("Soft time limit reached; returning the partial count")
        return {"low": low, "high": high, "primes": count, "partial": True, "checked_below": start}
    return {"low": low, "high": high, "primes": count}


@catalog.job(
    form=SumResultsParams,
    title="Sum results",
    description="A chord's callback: adds up one field of every result of the group before it.",
    queue="default",
    # The list of a big group's results can be large: compress the message.
    compression="zlib",
)
def sum_results(self, results: list | None = None, *, field: str) -> dict:
    values = [r.get(field, 0) for r in results or [] if isinstance(r, dict)]
    partial = any(isinstance(r, dict) and r.get("partial") for r in results or [])
    logger.info("Adding up %s of %d results", field, len(values))
    return {field: sum(values), "parts": len(values), "partial": partial}


@catalog.job(
    form=MailSummaryParams,
    title="Mail a summary",
    description="Mails the previous workflow step's result (e.g. a report's totals).",
    queue="default",
    max_retries=3,
    guard=True,  # an e-mail must not go out twice
    rate_limit="60/m",  # mail providers throttle senders
)
def mail_summary(self, previous: dict | None = None, *, to: str, subject: str) -> dict:
    lines = [f"{key}: {value}" for key, value in (previous or {}).items()]
    body = "\n".join(lines) or "The previous step returned nothing."
    sent = django_send_mail(subject, body, None, [to])
    logger.info("Summary mailed to %s (%d lines)", to, len(lines))
    return {"to": to, "sent": sent, "summary": previous or {}}


@catalog.job(
    form=WorkflowFailedParams,
    title="Workflow failed (errback)",
    description="Runs when a workflow step fails: records which step failed and marks "
    "the steps that can no longer run.",
    queue="default",
)
def workflow_failed(self, failed_task_id: str | None = None, *, workflow_id: str) -> dict:
    from jobs.services import workflow_record_failure

    return workflow_record_failure(
        workflow_id=workflow_id, failed_task_id=failed_task_id, errback_id=self.request.id
    )


@catalog.job(
    form=RegionalReportParams,
    title="Regional report (topic route)",
    description="Published on the topic exchange with the key reports.<kind>.<region>: "
    "EMEA reports reach reports_emea and reports_all, others reports_all only.",
    queue="reports_all",
    route="regional-reports",
    guard=True,  # a key matching two bindings is delivered twice: run it once
    rate_limit="30/m",
)
def regional_report(self, *, kind: str, region: str, rows: int) -> dict:
    delivery = self.request.delivery_info or {}
    rng = random.Random(f"{kind}-{region}-{rows}")
    total = round(sum(rng.lognormvariate(3, 1) for _ in range(rows)), 2)
    return {"kind": kind, "region": region, "rows": rows, "total": total,
            "routing_key": delivery.get("routing_key")}  # fmt: skip


@catalog.job(
    form=ClearCachesParams,
    title="Clear local caches (broadcast)",
    description="Sent to the fanout exchange: every worker runs its own copy and records "
    "it as a child run named <run id>:<worker>.",
    queue="broadcast_tasks",
    route="broadcast",
)
def clear_caches(self, *, reason: str) -> dict:
    from jobs.services import broadcast_record

    hostname = self.request.hostname or ""
    broadcast_record(job_id=self.request.id, hostname=hostname, result=None)
    cleared = _clear_local_caches()
    result = {"worker": hostname, "pid": os.getpid(), "cleared": cleared, "reason": reason}
    broadcast_record(job_id=self.request.id, hostname=hostname, result=result)
    return result


def _clear_local_caches() -> list[str]:
    from django.core.cache import caches

    # Django's default cache is per process (locmem): only a broadcast reaches them all.
    for alias in caches:
        caches[alias].clear()
    return list(caches)


@catalog.job(
    form=CapabilityParams,
    title="Capability-routed job (headers route)",
    description="Published on the headers exchange: gpu=yes and region=emea reach "
    "gpu_emea (x-match all); gpu=yes or lane=express reach accelerated (x-match any). "
    "RabbitMQ only.",
    queue="accelerated",
    route="capabilities",
    guard=True,  # matching both bindings delivers it twice: run it once
)
def capability_job(self, *, gpu: bool, region: str, lane: str) -> dict:
    delivery = self.request.delivery_info or {}
    return {"gpu": gpu, "region": region, "lane": lane, "exchange": delivery.get("exchange")}


# --- Benchmarks -------------------------------------------------------------------
# `noop` measures what tracking costs (bench/tracking.py): a catalogued job that does
# nothing, fully tracked. `jobsite.bench_noop` is the same with no tracking at all
# (named jobsite.*, so never a run), only counting itself in Redis so that the
# benchmark knows when the raw queue has drained.


class NoopParams(forms.Form):
    """No parameters."""


@catalog.job(
    form=NoopParams,
    title="No-op (benchmark)",
    description="Does nothing: used to measure what run tracking costs.",
    queue="default",
    # Benchmarks send it to their own queue, so that no other worker takes their runs.
    queues=("default", "bench"),
    # Acknowledged once its final state is stored, as the tracking benchmark measures.
    acks_late=True,
)
def noop(self) -> dict:
    return {}


BENCH_COUNTER_KEY = "jobsite:bench:noop_raw"


@functools.cache
def _bench_redis():
    from jobs import guard

    return guard.client()  # one connection pool per worker process


@shared_task(name="jobsite.bench_noop", ignore_result=True)
def bench_noop() -> None:
    _bench_redis().incr(BENCH_COUNTER_KEY)


# --- Maintenance (not job types: named jobsite.*, never shown as runs) ------------


@shared_task(name="jobsite.terminate_followup", ignore_result=True)
def terminate_followup(job_id: str) -> None:
    """SIGKILL a terminated run that did not stop within its grace period."""
    from jobs.models import FINISHED_STATES, Job

    state = Job.objects.filter(pk=job_id).values_list("state", flat=True).first()
    if state is not None and state not in FINISHED_STATES:
        logger.warning("Run %s ignored SIGTERM; sending SIGKILL", job_id)
        terminate_followup.app.control.revoke(job_id, terminate=True, signal="SIGKILL")


@shared_task(name="jobsite.alerts_check", ignore_result=True)
def alerts_check() -> None:
    """Alert on runs that failed, schedules that missed, beat or workers gone silent."""
    from jobs import alerts

    result = alerts.alerts_check()
    if result.raised or result.folded:
        logger.info("Alerts: %d raised, %d folded", result.raised, result.folded)


@shared_task(name="jobsite.relay", ignore_result=True)
def relay() -> int:
    """Publish runs that were stored while the broker was down."""
    from jobs.services import jobs_relay

    return jobs_relay()


@shared_task(name="jobsite.mark_lost", ignore_result=True)
def mark_lost() -> int:
    """Runs whose worker went silent become LOST; runs that expired unstarted, cancelled."""
    from jobs.services import jobs_expire, jobs_mark_lost

    return jobs_mark_lost() + jobs_expire()


@shared_task(name="jobsite.cleanup", ignore_result=True)
def cleanup() -> dict:
    from jobs.services import jobs_cleanup

    return jobs_cleanup()
