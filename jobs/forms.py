"""Forms: the demo job types' parameter forms and the submit options form."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.utils import timezone

from jobs.routing import ALL_QUEUE_NAMES

# --- Parameter forms of the demo job types -------------------------------------


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
        data = super().clean()
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
        self.fields["queue"].choices = [(q, q) for q in queues]
        self.fields["queue"].initial = job_type.queue
        self.fields["priority"].initial = job_type.priority
        self.fields["countdown"].initial = job_type.countdown or None
        self.fields["expires"].initial = job_type.expires
        self.fields["max_retries"].initial = job_type.max_retries

    def clean_run_at(self):
        run_at = self.cleaned_data.get("run_at")
        if run_at and run_at < timezone.now() - timedelta(minutes=1):
            raise forms.ValidationError("This time is in the past.")
        return run_at


class WorkerActionForm(forms.Form):
    ACTIONS = [
        ("pool_grow", "Grow pool"),
        ("pool_shrink", "Shrink pool"),
        ("consumer_add", "Consume queue"),
        ("consumer_cancel", "Stop consuming queue"),
        ("shutdown", "Shut down"),
    ]

    worker = forms.CharField(max_length=255)
    action = forms.ChoiceField(choices=ACTIONS)
    queue = forms.ChoiceField(
        choices=[("", "—"), *((q, q) for q in ALL_QUEUE_NAMES)], required=False
    )
    n = forms.IntegerField(min_value=1, max_value=16, required=False, initial=1)

    def clean(self):
        data = super().clean()
        if data.get("action", "").startswith("consumer_") and not data.get("queue"):
            raise forms.ValidationError("Choose a queue.")
        if data.get("action") == "shutdown" and self.data.get("confirm") != data.get("worker"):
            raise forms.ValidationError("Type the worker's name to confirm the shutdown.")
        data["n"] = data.get("n") or 1
        return data
