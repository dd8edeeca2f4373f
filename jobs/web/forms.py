"""Forms of the web pages (the submit options form is shared with the API: jobs.forms)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from django import forms

from jobs.routing import ALL_QUEUE_NAMES


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
        super().clean()
        data = self.cleaned_data
        if data.get("action", "").startswith("consumer_") and not data.get("queue"):
            raise forms.ValidationError("Choose a queue.")
        if data.get("action") == "shutdown" and self.data.get("confirm") != data.get("worker"):
            raise forms.ValidationError("Type the worker's name to confirm the shutdown.")
        data["n"] = data.get("n") or 1
        return data


# --- Task limits, autoscale, pool restart, cancel by task name --------------------------

RATE_LIMIT = re.compile(r"^(?P<count>\d{1,9})(?:/(?P<unit>[smh]))?$")
UNKNOWN_TASK = "Unknown task “%(value)s”: choose one of the tasks in the list."


class WorkerControlForm(forms.Form):
    """A control of one worker; ``task_names`` are the only task names offered or accepted."""

    worker = forms.CharField(max_length=255)

    def __init__(self, *args, task_names: Iterable[str] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if "task_name" in self.fields:
            field = self.fields["task_name"]
            assert isinstance(field, forms.ChoiceField)
            field.choices = [(name, name) for name in task_names]


def _task_field() -> forms.ChoiceField:
    return forms.ChoiceField(label="Task", error_messages={"invalid_choice": UNKNOWN_TASK})


class RateLimitForm(WorkerControlForm):
    task_name = _task_field()
    rate_limit = forms.CharField(
        label="Rate limit",
        max_length=20,
        required=False,
        help_text="Runs started per second, minute or hour: 10/m, 2/s, 100/h, or 5 (per "
        "second). Empty or 0: no limit.",
    )

    def clean_rate_limit(self) -> str | None:
        value = self.cleaned_data["rate_limit"].replace(" ", "")
        match = RATE_LIMIT.match(value)
        if value and not match:
            raise forms.ValidationError(
                f"“{value}” is not a rate limit: write N, N/s, N/m or N/h (e.g. 10/m); "
                "empty or 0 for no limit."
            )
        if not match or int(match["count"]) == 0:
            return None  # Celery's "no limit"
        return f"{int(match['count'])}/{match['unit']}" if match["unit"] else match["count"]


class TimeLimitForm(WorkerControlForm):
    task_name = _task_field()
    soft = forms.IntegerField(
        label="Soft limit (s)", min_value=1, max_value=7 * 86400, required=False
    )
    hard = forms.IntegerField(
        label="Hard limit (s)", min_value=1, max_value=7 * 86400, required=False
    )

    def clean(self):
        data = self.cleaned_data
        soft, hard = data.get("soft"), data.get("hard")
        if soft is not None and hard is not None and soft >= hard:
            raise forms.ValidationError(
                f"The soft limit ({soft} s) must be shorter than the hard limit ({hard} s)."
            )
        return data


class AutoscaleForm(WorkerControlForm):
    maximum = forms.IntegerField(label="Max processes", min_value=1, max_value=64)
    minimum = forms.IntegerField(label="Min processes", min_value=0, max_value=64)

    def clean(self):
        data = self.cleaned_data
        low, high = data.get("minimum"), data.get("maximum")
        if low is not None and high is not None and low > high:
            raise forms.ValidationError(
                f"The minimum ({low}) must not be more than the maximum ({high})."
            )
        return data


class PoolRestartForm(WorkerControlForm):
    pass


class RevokeByNameForm(forms.Form):
    task_name = _task_field()
    terminate = forms.BooleanField(
        label="Also stop the runs already running (SIGTERM, then SIGKILL)", required=False
    )

    def __init__(self, *args, task_names: Iterable[str] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["task_name"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [("", "— choose a task —"), *((name, name) for name in task_names)]
