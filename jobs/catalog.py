"""Declaring Celery tasks as job types.

A job type is declared next to its task, in code:

    @catalog.job(form=SendMailForm, title="Send mail", queue="default")
    def send_mail(self, *, to, subject, body): ...

The decorator makes a Celery task (bound, on the JobTask base class) and registers a
JobSpec (jobs.specs). The task keeps its own name: Celery's (``<module>.<function>``,
e.g. ``billing.tasks.send_invoice``) or an explicit ``name=``; the job type is named
after the function unless ``job_type=`` says otherwise. It works in any installed app's
``tasks`` module (JOBSITE_CATALOG_MODULES), discovered at startup as Celery discovers
tasks. ``catalog.remote(...)`` declares a job type whose task lives in another
codebase's workers: it is sent by name and never imported. On migrate, the declarations
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

__all__ = [
    "MASK",
    "JobSpec",
    "all_specs",
    "by_task_name",
    "get",
    "job",
    "register",
    "remote",
    "to_json",
]


def job(
    *,
    form: type[forms.Form],
    title: str,
    name: str | None = None,
    job_type: str | None = None,
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
        if name:
            task_options["name"] = name
        task = shared_task(bind=True, base=JobTask, **task_options)(func)
        task_options.pop("name", None)
        register(
            JobSpec(
                name=job_type or func.__name__,
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


def remote(
    task_name: str,
    *,
    form: type[forms.Form],
    title: str,
    job_type: str | None = None,
    queue: str = "default",
    **options,
) -> JobSpec:
    """Declare a job type whose task runs on workers of another codebase.

    Jobsite validates its parameters with ``form``, sends it by name (``send_task``) and
    never imports it. Its run's state is what those workers store: through Jobsite's
    result backend (``jobs.celery.install`` in their Celery app) every state shows in
    history as for Jobsite's own job types; otherwise the run stays as sent. ``options``
    are JobSpec's (priority, max_retries, time limits, expires, secret_fields, route...).
    The duplicate guard needs Jobsite's task base class, so a remote job type has none.
    """
    refused = {"guard", "task_options", "queues"} & set(options)
    if refused:
        raise TypeError(f"catalog.remote() takes no {', '.join(sorted(refused))}")
    if "secret_fields" in options:
        options["secret_fields"] = tuple(options["secret_fields"])
    spec = JobSpec(
        name=job_type or task_name.rsplit(".", 1)[-1],
        task_name=task_name,
        form=form,
        title=title,
        queue=queue,
        queues=(queue,),
        remote=True,
        **options,
    )
    register(spec)
    return spec
