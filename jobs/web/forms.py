"""Forms of the web pages (the submit options form is shared with the API: jobs.forms)."""

from __future__ import annotations

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
