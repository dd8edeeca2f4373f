"""Declaring Celery tasks as job types.

A job type is declared next to its task, in code:

    @catalog.job(form=SendMailForm, title="Send mail", queue="default")
    def send_mail(self, *, to, subject, body): ...

The decorator makes a Celery task (named ``jobs.<function name>``, bound, on the
JobTask base class) and registers a JobSpec (jobs.specs). On migrate, the declarations
are mirrored into the JobType table (services.jobtypes_sync), where staff edit
defaults and permissions. Only tasks declared here can ever be sent from a form, the
API or a schedule: no user types a task name.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import shared_task
from django import forms

from jobs.specs import MASK, JobSpec, all_specs, by_task_name, get, register, to_json
from jobs.worker.task import JobTask

__all__ = ["MASK", "JobSpec", "all_specs", "by_task_name", "get", "job", "register", "to_json"]


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
    internal: bool = False,
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
                internal=internal,
                task_options=task_options,
            )
        )
        return task

    return decorator
