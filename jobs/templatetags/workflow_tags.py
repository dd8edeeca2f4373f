"""The workflow section of a run's page, without touching the run view's context."""

import json

from django import template
from django.core.serializers.json import DjangoJSONEncoder

from jobs import selectors

register = template.Library()


@register.simple_tag(takes_context=True)
def workflow_tree(context, job):
    """The workflow ``job`` belongs to (see selectors.workflow_tree), or None."""
    return selectors.workflow_tree(job=job, user=context["request"].user)


@register.filter
def compact_json(value) -> str:
    """One-line JSON for a step's result in the tree (autoescaped like any string)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, cls=DjangoJSONEncoder)
