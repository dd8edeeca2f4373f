"""The job type registry: what each declared job type is (JobSpec), by name.

Filled by ``@catalog.job`` as the task modules are imported; read by every layer
(models, services, selectors, the worker). It imports nothing of Jobsite's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from django import forms
from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder

__all__ = [
    "MASK", "JobSpec", "all_specs", "by_task_name", "get", "internal_names", "register", "to_json",
]  # fmt: skip

MASK = "••••••"  # what a secret parameter shows everywhere it is output


@dataclass(frozen=True)
class JobSpec:
    name: str
    task_name: str
    form: type[forms.Form]
    title: str
    description: str = ""
    queue: str = "default"
    queues: tuple[str, ...] = ("default",)
    priority: int = 5
    max_retries: int = 0
    retry_backoff: int = 2
    soft_time_limit: int | None = None
    time_limit: int | None = None
    expires: int | None = None
    secret_fields: tuple[str, ...] = ()
    guard: bool = False
    route: str = ""  # a name in routing.ROUTES; empty: the direct queue above
    # Run by Jobsite itself (a workflow's errback), never submitted by a person: not
    # listed, refused by the form, the API, bulk submits and schedules.
    internal: bool = False
    task_options: dict = field(default_factory=dict)
    remote: bool = False  # catalog.remote: the task lives in another codebase's workers

    def mask(self, params: dict) -> dict:
        """Parameters with secret fields replaced, for pages, the API, logs and audit."""
        return {
            k: (MASK if k in self.secret_fields and v not in ("", None) else v)
            for k, v in params.items()
        }

    def defaults(self) -> dict:
        """The JobType row's initial values."""
        return {
            "task_name": self.task_name,
            "title": self.title,
            "description": self.description,
            "queue": self.queue,
            "priority": self.priority,
            "max_retries": self.max_retries,
            "retry_backoff": self.retry_backoff,
            "soft_time_limit": self.soft_time_limit,
            "time_limit": self.time_limit,
            "expires": self.expires,
        }

    def clean_params(self, data: dict | None) -> tuple[dict | None, dict]:
        """Validate raw parameters with the job type's form.

        Returns (JSON-safe params, {}) or (None, {field: [messages]}).
        """
        form = self.form(data=data or {})
        if not form.is_valid():
            return None, {name: list(errors) for name, errors in form.errors.items()}
        return to_json(form.cleaned_data), {}


_registry: dict[str, JobSpec] = {}


def to_json(value) -> dict:
    """Round-trip through JSON so dates and decimals become plain JSON values."""
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))


def register(spec: JobSpec) -> None:
    """Add a job type; a second one under the same name (or task) is a mistake."""
    for known in _registry.values():
        if known.name == spec.name and known.task_name != spec.task_name:
            raise ImproperlyConfigured(
                f"Two job types are named {spec.name!r} ({known.task_name} and "
                f"{spec.task_name}): give one of them job_type=."
            )
        if known.task_name == spec.task_name and known.name != spec.name:
            raise ImproperlyConfigured(
                f"The task {spec.task_name} is declared twice, as {known.name!r} and {spec.name!r}."
            )
    _registry[spec.name] = spec


def get(name: str) -> JobSpec | None:
    return _registry.get(name)


def by_task_name(task_name: str) -> JobSpec | None:
    return next((s for s in _registry.values() if s.task_name == task_name), None)


def all_specs() -> list[JobSpec]:
    return list(_registry.values())


def internal_names() -> set[str]:
    """The job types no person may submit (JobSpec.internal)."""
    return {s.name for s in _registry.values() if s.internal}
