"""A job type's parameter form as JSON Schema (jobs.api.form_schema)."""

from __future__ import annotations

from django import forms

from jobs.api.form_schema import form_json_schema


def test_the_form_schema_covers_every_field_kind():
    class Everything(forms.Form):
        flag = forms.BooleanField(required=False, initial=True)
        when = forms.DateTimeField(help_text="When.")
        ratio = forms.FloatField(min_value=0.5)
        amount = forms.DecimalField(max_value=10)
        site = forms.URLField(assume_scheme="https")
        kind = forms.ChoiceField(choices=[("", "—"), ("a", "A")], required=False)

    schema = form_json_schema(Everything())

    props = schema["properties"]
    assert props["flag"] == {"type": "boolean", "title": "Flag", "default": True}
    assert props["when"] == {
        "type": "string", "format": "date-time", "title": "When", "description": "When."
    }  # fmt: skip
    assert props["ratio"] == {"type": "number", "minimum": 0.5, "title": "Ratio"}
    assert props["amount"] == {"type": "number", "maximum": 10, "title": "Amount"}
    assert props["site"]["format"] == "uri"
    assert props["kind"]["enum"] == ["a"]
    assert schema["required"] == ["when", "ratio", "amount", "site"]
    assert schema["additionalProperties"] is False
