"""Workflow steps and routing demos.

Steps that take the previous step's result (a chain passes it as the first positional
argument; a chord passes the list of its header's results), the workflows' errback,
and job types that show the topic, fanout and headers routes.
"""

from __future__ import annotations

import logging
import math
import os
import random

from celery.exceptions import SoftTimeLimitExceeded
from django import forms
from django.core.mail import send_mail as django_send_mail

from jobs import catalog
from jobs.services import broadcast_record, workflow_record_failure
from jobs.tasks.demo import ReportParams, count_segment, small_primes
from jobs.worker.task import report_progress

logger = logging.getLogger(__name__)


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
    base = small_primes(math.isqrt(high) + 1)
    segment = 1_000_000
    count, start = 0, low
    try:
        while start < high:
            end = min(high, start + segment)
            count += count_segment(start, end, base)
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
    internal=True,  # its workflow id is someone's workflow: only Jobsite sends it
)
def workflow_failed(self, failed_task_id: str | None = None, *, workflow_id: str) -> dict:
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
