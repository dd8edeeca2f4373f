"""The demo workflow templates: chains, groups and chords of the demo job types."""

from __future__ import annotations

import itertools

from django import forms

from jobs import workflows
from jobs.tasks.demo import FlakyParams, ReportParams
from jobs.workflows import WorkflowTemplate, in_chain, in_chord, in_group, step


class ReportThenMailForm(forms.Form):
    title = forms.CharField(label="Report title", max_length=100, initial="Daily sales")
    region = forms.ChoiceField(label="Region", choices=ReportParams.REGIONS, initial="emea")
    days = forms.IntegerField(label="Days", min_value=1, max_value=366, initial=7)
    rows_per_day = forms.IntegerField(
        label="Rows per day", min_value=1, max_value=10_000, initial=100
    )
    to = forms.EmailField(label="Mail the summary to", initial="sales@example.com")
    subject = forms.CharField(label="Subject", max_length=200, initial="Your sales report")


def _report_then_mail(p: dict) -> dict:
    report = {
        "title": p["title"], "region": p["region"], "days": p["days"],
        "rows_per_day": p["rows_per_day"], "pace_ms": 0,
    }  # fmt: skip
    return in_chain(
        step("generate_report", report, f"{p['title']} ({p['region']})"),
        step(
            "mail_summary",
            {"to": p["to"], "subject": p["subject"]},
            f"Mail to {p['to']}",
            takes_result=True,
        ),
    )


class PrimesSumForm(forms.Form):
    limit = forms.IntegerField(
        label="Count primes below", min_value=10, max_value=100_000_000, initial=4_000_000
    )
    parts = forms.IntegerField(
        label="Parallel parts", min_value=1, max_value=16, initial=4,
        help_text="One job per slice of the range, run in parallel; a callback sums them.",
    )  # fmt: skip


def _primes_sum(p: dict) -> dict:
    limit, parts = p["limit"], p["parts"]
    bounds = [limit * i // parts for i in range(parts + 1)]
    header = [
        step("count_primes_range", {"low": lo, "high": hi}, f"Primes in [{lo:,}, {hi:,})")
        for lo, hi in itertools.pairwise(bounds)
        if hi > lo
    ]
    body = step("sum_results", {"field": "primes"}, "Sum the counts", takes_result=True)
    return in_chord(header, body)


class RegionReportsForm(forms.Form):
    regions = forms.MultipleChoiceField(
        label="Regions", choices=ReportParams.REGIONS, initial=["emea", "amer", "apac"],
        widget=forms.CheckboxSelectMultiple,
    )  # fmt: skip
    days = forms.IntegerField(label="Days", min_value=1, max_value=366, initial=7)
    rows_per_day = forms.IntegerField(
        label="Rows per day", min_value=1, max_value=10_000, initial=100
    )


def _region_reports(p: dict) -> dict:
    return in_group(
        *(
            step(
                "generate_report",
                {
                    "title": f"Sales {region.upper()}",
                    "region": region,
                    "days": p["days"],
                    "rows_per_day": p["rows_per_day"],
                    "pace_ms": 0,
                },
                f"Report {region.upper()}",
            )
            for region in p["regions"]
        )
    )


class FlakyThenMailForm(forms.Form):
    mode = forms.ChoiceField(
        label="First step",
        choices=[c for c in FlakyParams.MODES if c[0] in ("succeed", "retry", "fail")],
        initial="fail",
    )
    failures = forms.IntegerField(
        label="Failures before success", min_value=0, max_value=3, initial=1
    )
    to = forms.EmailField(label="Mail the outcome to", initial="ops@example.com")


def _flaky_then_mail(p: dict) -> dict:
    flaky = {"mode": p["mode"], "failures": p["failures"], "message": "Step failed on purpose"}
    return in_chain(
        step("flaky", flaky, f"Flaky step ({p['mode']})"),
        step(
            "mail_summary",
            {"to": p["to"], "subject": "Flaky step done"},
            f"Mail to {p['to']}",
            takes_result=True,
        ),
    )


for _template in (
    WorkflowTemplate(
        "report_then_mail",
        "Report, then mail it",
        "A chain: a sales report, then an e-mail with its totals (the report's result "
        "is passed to the mail step).",
        "chain",
        ReportThenMailForm,
        _report_then_mail,
    ),
    WorkflowTemplate(
        "primes_sum",
        "Primes in parallel, then sum",
        "A chord: the range is split into parts counted in parallel; when all are "
        "done, a callback adds the counts up.",
        "chord",
        PrimesSumForm,
        _primes_sum,
    ),
    WorkflowTemplate(
        "region_reports",
        "One report per region",
        "A group: one sales report per chosen region, all at once.",
        "group",
        RegionReportsForm,
        _region_reports,
    ),
    WorkflowTemplate(
        "flaky_then_mail",
        "Flaky step, then mail",
        "A chain whose first step may fail: on failure the errback records which step "
        "failed and the mail step is not run.",
        "chain",
        FlakyThenMailForm,
        _flaky_then_mail,
    ),
):
    workflows.register(_template)
