"""A job type's parameter form as a JSON Schema, for API clients.

Hand-written because no maintained library maps plain Django forms (not DRF
serializers) to JSON Schema; it covers the field types the job forms use, and an
unknown field type becomes a plain string, which is how a form receives it anyway.
"""

from __future__ import annotations

from decimal import Decimal

from django import forms
from django.core import validators
from django.forms.utils import pretty_name


def form_json_schema(form: forms.Form) -> dict:
    """JSON Schema (draft 2020-12) of a bound or unbound form instance."""
    properties = {name: field_json_schema(name, field) for name, field in form.fields.items()}
    required = [name for name, field in form.fields.items() if field.required]
    schema: dict = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def field_json_schema(name: str, field: forms.Field) -> dict:
    schema = _type_of(field)
    schema.update(_bounds(field))
    schema["title"] = str(field.label or pretty_name(name))  # as the form page labels it
    if field.help_text:
        schema["description"] = str(field.help_text)
    default = field.initial() if callable(field.initial) else field.initial
    if default is not None:
        schema["default"] = _json_value(default)
    return schema


def _type_of(field: forms.Field) -> dict:
    # Subclasses before their bases: EmailField is a CharField, FloatField an IntegerField.
    if isinstance(field, forms.BooleanField):
        return {"type": "boolean"}
    if isinstance(field, forms.ChoiceField):
        return {"type": "string", "enum": [str(value) for value, _ in _flat_choices(field)]}
    if isinstance(field, forms.EmailField):
        return {"type": "string", "format": "email"}
    if isinstance(field, forms.URLField):
        return {"type": "string", "format": "uri"}
    if isinstance(field, forms.SlugField):
        return {"type": "string", "pattern": r"^[-a-zA-Z0-9_]+$"}
    if isinstance(field, forms.DateTimeField):
        return {"type": "string", "format": "date-time"}
    if isinstance(field, forms.DateField):
        return {"type": "string", "format": "date"}
    if isinstance(field, forms.FloatField | forms.DecimalField):
        return {"type": "number"}
    if isinstance(field, forms.IntegerField):
        return {"type": "integer"}
    return {"type": "string"}


def _flat_choices(field: forms.ChoiceField) -> list[tuple]:
    """Choices with option groups flattened, without the empty choice of an optional field."""
    flat: list[tuple] = []
    # The getter gives the normalised list; django-stubs type it as the setter's input.
    for value, label in field.choices:  # type: ignore[misc,union-attr]
        if isinstance(label, list | tuple):
            flat.extend(label)
        else:
            flat.append((value, label))
    return [(value, label) for value, label in flat if value != "" or field.required]


def _bounds(field: forms.Field) -> dict:
    """Length and range limits, read from the field's validators."""
    keys = {
        validators.MinValueValidator: "minimum",
        validators.MaxValueValidator: "maximum",
        validators.MinLengthValidator: "minLength",
        validators.MaxLengthValidator: "maxLength",
    }
    bounds = {}
    for validator in field.validators:
        if not isinstance(validator, validators.BaseValidator):
            continue
        key = keys.get(type(validator))
        if key and not callable(validator.limit_value):
            bounds[key] = _json_value(validator.limit_value)
    return bounds


def _json_value(value):
    if isinstance(value, Decimal):
        return float(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
