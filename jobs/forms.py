"""The submit options form: queue, priority, countdown/ETA, expiry, for every job type."""

from __future__ import annotations

from datetime import timedelta
from typing import cast

from celery import current_app
from django import forms
from django.conf import settings
from django.utils import timezone


def max_eta() -> timedelta:
    """How far ahead a run may be put off (run_at, countdown).

    JOBSITE_MAX_ETA_DAYS; on a Redis broker also at most the visibility timeout: a
    message with an ETA waits unacknowledged in a worker, and Redis hands it to another
    worker once it has waited that long, so a later ETA would run the job twice (or,
    for a guarded job type, leave copies circulating until it runs).
    """
    limit = timedelta(days=settings.JOBSITE_MAX_ETA_DAYS)
    if _on_redis():
        options = current_app.conf.broker_transport_options or {}
        limit = min(limit, timedelta(seconds=options.get("visibility_timeout", 3600)))
    return limit


def _on_redis() -> bool:
    url = (current_app.conf.broker_url or "").split(";")[0]
    return url.split("://")[0].split("+")[0] in ("redis", "rediss", "sentinel")


def _eta_refusal(limit: timedelta) -> str:
    if limit < timedelta(days=settings.JOBSITE_MAX_ETA_DAYS):
        return (
            f"A run may start at most {int(limit.total_seconds()):,} s ahead: on Redis, a "
            "message waiting longer than the visibility timeout is delivered again."
        )
    return f"A run may start at most {settings.JOBSITE_MAX_ETA_DAYS} days ahead."


# --- Submit options ------------------------------------------------------------


class SubmitOptionsForm(forms.Form):
    """The "advanced options" of a submit; defaults come from the job type."""

    queue = forms.ChoiceField(label="Queue")
    priority = forms.IntegerField(
        label="Priority", min_value=0, max_value=9, help_text="0 lowest, 9 highest."
    )
    countdown = forms.IntegerField(
        label="Start after (s)", min_value=0, max_value=30 * 86_400, required=False
    )
    run_at = forms.DateTimeField(
        label="Or run at",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="In the server's time zone; overrides the countdown.",
    )
    expires = forms.IntegerField(
        label="Expires after (s)",
        min_value=1,
        max_value=30 * 86_400,
        required=False,
        help_text="Discard the run if it has not started by then.",
    )
    max_retries = forms.IntegerField(label="Max retries", min_value=0, max_value=50)
    idempotency_key = forms.CharField(
        label="Idempotency key",
        max_length=200,
        required=False,
        help_text="Submitting again with the same key returns the existing run.",
    )

    def __init__(self, *args, job_type, **kwargs) -> None:
        kwargs.setdefault("prefix", "opt")
        super().__init__(*args, **kwargs)
        self.job_type = job_type
        queues = job_type.spec.queues if job_type.spec else (job_type.queue,)
        if job_type.queue not in queues:
            queues = (job_type.queue, *queues)
        cast(forms.ChoiceField, self.fields["queue"]).choices = [(q, q) for q in queues]
        self.fields["queue"].initial = job_type.queue
        self.fields["priority"].initial = job_type.priority
        self.fields["countdown"].initial = job_type.countdown or None
        self.fields["expires"].initial = job_type.expires
        self.fields["max_retries"].initial = job_type.max_retries

    def clean_run_at(self):
        run_at = self.cleaned_data.get("run_at")
        if run_at and run_at < timezone.now() - timedelta(minutes=1):
            raise forms.ValidationError("This time is in the past.")
        if run_at and run_at > timezone.now() + max_eta():
            raise forms.ValidationError(_eta_refusal(max_eta()))
        return run_at

    def clean_countdown(self):
        countdown = self.cleaned_data.get("countdown")
        if countdown and timedelta(seconds=countdown) > max_eta():
            raise forms.ValidationError(_eta_refusal(max_eta()))
        return countdown
