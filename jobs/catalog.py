"""Declaring Celery tasks as job types.

A job type is declared next to its task, in code:

    @catalog.job(form=SendMailForm, title="Send mail", queue="default")
    def send_mail(self, *, to, subject, body): ...

The decorator makes a Celery task (named ``jobs.<function name>``, bound, on the
JobTask base class) and registers a JobSpec. ``sync()`` mirrors the declarations into
the JobType table, where staff edit defaults and permissions. Only tasks declared here
can ever be sent from a form, the API or a schedule: no user types a task name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["MASK", "JobSpec", "all_specs", "by_task_name", "get", "job", "register", "sync"]

from celery import shared_task
from django import forms
from django.core.serializers.json import DjangoJSONEncoder

from jobs.tracking import MASK, JobTask


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
    task_options: dict = field(default_factory=dict)

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


def job(
    *,
    form: type[forms.Form],
    title: str,
    description: str = "",
    queue: str = "default",
    queues: tuple[str, ...] | None = None,
    priority: int = 5,
    max_retries: int = 0,
    retry_backoff: int = 2,
    soft_time_limit: int | None = None,
    time_limit: int | None = None,
    expires: int | None = None,
    secret_fields: tuple[str, ...] = (),
    guard: bool = False,
    route: str = "",
    **task_options,
) -> Callable:
    """Declare a function as a Celery task that people may run as a job type."""

    def decorator(func: Callable):
        name = func.__name__
        if guard:
            # Acknowledge only after the run is recorded, requeue if the worker is lost
            # (bounded by max_retries), and let the Redis marker stop a second execution.
            task_options.update(
                acks_late=True,
                reject_on_worker_lost=True,
                retry_on_worker_lost=True,
                # A lost worker's retry waits this long (Celery's default is 3 min).
                default_retry_delay=task_options.get("default_retry_delay", 2),
                jobsite_guard=True,
            )
        task = shared_task(name=f"jobs.{name}", bind=True, base=JobTask, **task_options)(func)
        register(
            JobSpec(
                name=name,
                task_name=task.name,
                form=form,
                title=title,
                description=description or (func.__doc__ or "").strip(),
                queue=queue,
                queues=tuple(queues or (queue,)),
                priority=priority,
                max_retries=max_retries,
                retry_backoff=retry_backoff,
                soft_time_limit=soft_time_limit,
                time_limit=time_limit,
                expires=expires,
                secret_fields=tuple(secret_fields),
                guard=guard,
                route=route,
                task_options=task_options,
            )
        )
        return task

    return decorator


def register(spec: JobSpec) -> None:
    _registry[spec.name] = spec


def get(name: str) -> JobSpec | None:
    return _registry.get(name)


def by_task_name(task_name: str) -> JobSpec | None:
    return next((s for s in _registry.values() if s.task_name == task_name), None)


def all_specs() -> list[JobSpec]:
    return list(_registry.values())


def sync() -> int:
    """Create a JobType row for every declared job type that has none yet.

    Existing rows keep what staff edited; only the task name follows the code.
    Returns how many rows were created.
    """
    from jobs.models import JobType

    created = 0
    for spec in all_specs():
        obj, was_created = JobType.objects.get_or_create(name=spec.name, defaults=spec.defaults())
        created += was_created
        if not was_created and obj.task_name != spec.task_name:
            obj.task_name = spec.task_name
            obj.save(update_fields=["task_name", "updated_at"])
    return created
