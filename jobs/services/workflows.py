"""Workflows: a plan of runs sent as one Celery canvas, its errback and its cancel."""

from __future__ import annotations

import logging
import uuid

from celery import current_app
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from jobs import markers, routing, specs, workflows
from jobs.models import (
    AuditAction,
    Job,
    JobSource,
    JobState,
    JobType,
)
from jobs.services.audit import audit_record
from jobs.services.errors import BROKER_ERRORS
from jobs.services.messages import (
    _check_size,
    _effective_options,
    _parse_time,
    broker_breaker,
    message_kwargs,
    message_options,
)

logger = logging.getLogger(__name__)


def workflow_submit(*, workflow: str, params: dict, user, source: str = JobSource.FORM) -> Job:
    """Store every step of a workflow as a PENDING run, then publish it as one canvas.

    ``params`` are cleaned by the template's form. Each step's parameters are checked
    again by its job type's form. Returns the root run: the first step, whose id is
    the workflow id (every step's ``workflow_id``; Celery's ``root_id``). Raises
    ValidationError (unknown template, invalid step) or PermissionDenied (a job type
    the user may not run).
    """

    template = workflows.get(workflow)
    if template is None:
        raise ValidationError(f"There is no workflow {workflow!r}.", code="unknown")
    params = specs.to_json(params)
    plan = template.build(params)
    jobs = _workflow_jobs(plan, user)
    root = jobs[0]
    root.options["workflow"].update(
        name=template.name, title=template.title, shape=template.shape, plan=plan,
        params=params, source=source,
    )  # fmt: skip
    with transaction.atomic():
        Job.objects.bulk_create(jobs)
        audit_record(
            actor=user, action=AuditAction.SUBMIT, target_type="workflow", target_id=root.pk,
            target_repr=template.title, details={"params": params, "steps": [j.pk for j in jobs]},
        )  # fmt: skip
        transaction.on_commit(lambda: workflow_publish(workflow_id=root.pk))
    return root


def _workflow_jobs(plan: dict, user) -> list[Job]:
    """One unsaved PENDING Job per step; gives each plan step its run id."""

    nodes = list(workflows.steps(plan))
    for node in nodes:
        node["id"] = str(uuid.uuid4())
    workflow_id = nodes[0]["id"]
    links = workflows.parents(plan)
    job_types = _workflow_job_types({node["job_type"] for node in nodes}, user)
    jobs = []
    for node in nodes:
        job_type = job_types[node["job_type"]]
        spec = specs.get(job_type.name)
        assert spec is not None  # _workflow_job_types refused any not in the catalogue
        params, errors = spec.clean_params(node.pop("params"))
        if params is None:
            raise ValidationError(f"Step “{node['label']}” is invalid: {errors}", code="invalid")
        _check_size(params)
        options = _effective_options(job_type, {})
        for unused in ("idempotency_key", "eta"):  # steps start when their turn comes
            options.pop(unused, None)
        options.update(message_options(job_type=job_type, params=params, options=options))
        options["workflow"] = {"id": workflow_id, "label": node["label"],
                               "parents": links[node["id"]]}  # fmt: skip
        job = Job(
            id=node["id"], job_type=job_type, task_name=job_type.task_name, params=params,
            options=options, source=JobSource.WORKFLOW, submitted_by=user,
            workflow_id=workflow_id, queue=options["queue"], priority=options["priority"],
            expires_at=_parse_time(options.get("expires_at")),
        )  # fmt: skip
        jobs.append(job)
    return jobs


def _workflow_job_types(names: set[str], user) -> dict[str, JobType]:
    found = {jt.name: jt for jt in JobType.objects.filter(name__in=names)}
    for name in sorted(names):
        job_type = found.get(name)
        if job_type is None or specs.get(name) is None:
            raise ValidationError(f"The job type {name!r} is not in the catalogue.")
        if not job_type.enabled:
            raise PermissionDenied(f"“{job_type}” is disabled.")
        if not job_type.is_runnable_by(user):
            raise PermissionDenied(f"You may not run “{job_type}”, a step of this workflow.")
    return found


def workflow_publish(*, workflow_id: str, force: bool = False) -> bool:
    """Publish a stored workflow's canvas once (the submit, or the relay); False if the
    broker is unreachable (every step stays unsent, for the relay)."""

    if not force and not broker_breaker.allows():
        logger.info("Broker recently unreachable; workflow %s stored unsent", workflow_id)
        return False
    with transaction.atomic():
        root = Job.objects.select_for_update().filter(pk=workflow_id, sent_at__isnull=True).first()
        if root is None:
            return True  # already published: the relay meets every step of it
        runs = {job.pk: job for job in Job.objects.filter(workflow_id=workflow_id)}
        canvas = workflows.to_canvas(
            root.options["workflow"]["plan"],
            lambda node: _step_signature(runs[node["id"]], node, workflow_id),
        )
        workflows.link_error(canvas, _errback_signature(workflow_id))
        try:
            canvas.apply_async()
        except BROKER_ERRORS as exc:
            broker_breaker.tripped()
            logger.warning("Broker unavailable, workflow %s stays unsent: %s", workflow_id, exc)
            return False
        broker_breaker.reset()
        # The later steps travel inside the first messages (chain and chord options).
        Job.objects.filter(workflow_id=workflow_id, sent_at__isnull=True).update(
            sent_at=timezone.now()
        )
    return True


def _step_signature(job: Job, node: dict, workflow_id: str):
    from celery import signature

    options = job.options
    headers = {
        # A schedule's own headers (its run-now keeps them), then Jobsite's.
        **options.get("headers", {}),
        **({"periodic_task_name": job.schedule_name} if job.schedule_name else {}),
        "jobsite_max_retries": options.get("max_retries"),
        "jobsite_retry_backoff": options.get("retry_backoff"),
        "jobsite_retry_backoff_max": options.get("retry_backoff_max"),
    }
    route = message_kwargs(job=job, headers=headers)
    route.pop("declare", None)  # entities cannot travel inside a chain message
    return signature(
        job.task_name,
        kwargs=job.params,
        immutable=not node["takes_result"],
        task_id=job.pk,
        root_id=workflow_id,
        expires=options.get("expires_at"),
        soft_time_limit=options.get("soft_time_limit"),
        time_limit=options.get("time_limit"),
        **route,
    )


def _errback_signature(workflow_id: str):
    from celery import signature

    return signature(
        "jobs.workflow_failed",
        kwargs={"workflow_id": workflow_id},
        queue="default",
        root_id=workflow_id,
        priority=routing.wire_priority(9, current_app.conf.broker_url),
    )


def workflow_record_failure(*, workflow_id: str, failed_task_id: str | None, errback_id: str):
    """The errback's work: find the failed step, mark the steps that can no longer run
    as not run, link the errback's own run to the workflow; returns its result."""

    root = Job.objects.filter(pk=workflow_id).first()
    if root is None:
        return {"workflow": workflow_id, "failed_step": failed_task_id, "note": "unknown"}
    failed = _failed_step(workflow_id, failed_task_id)
    plan = root.options.get("workflow", {}).get("plan")
    not_run = sorted(workflows.downstream(plan, failed.pk)) if plan and failed else []
    now = timezone.now()
    # Celery also stores the failure on the chain's later steps; they never started.
    Job.objects.filter(
        pk__in=not_run, state__in=[JobState.PENDING, JobState.FAILURE], started_at__isnull=True
    ).update(
        state=JobState.REVOKED, finished_at=now, exception_type="", traceback="",
        error_message=f"Not run: the step {failed.pk if failed else '?'} failed.",
    )  # fmt: skip
    for pk in not_run:
        markers.mark_revoked(pk)  # should its message still arrive, it is skipped
    # The worker recorded this errback run on first sight, with nobody as submitter.
    Job.objects.filter(pk=errback_id).update(
        workflow_id=workflow_id, source=JobSource.WORKFLOW, submitted_by=root.submitted_by_id
    )
    result = {
        "workflow": workflow_id,
        "failed_step": failed.pk if failed else failed_task_id,
        "step": failed.options.get("workflow", {}).get("label", "") if failed else "",
        "error": f"{failed.exception_type}: {failed.error_message}" if failed else "",
        "not_run": not_run,
    }
    root.options["workflow"]["failure"] = result
    Job.objects.filter(pk=root.pk).update(options=root.options)
    return result


def _failed_step(workflow_id: str, failed_task_id: str | None) -> Job | None:
    """The step that failed: a chord's callback fails with ChordError when one of its
    group did, and the errback is then told about the callback, not the culprit."""
    failures = (
        Job.objects.filter(
            workflow_id=workflow_id, state=JobState.FAILURE, started_at__isnull=False
        )
        .exclude(exception_type="ChordError")
        .exclude(task_name="jobs.workflow_failed")
    )
    named = failures.filter(pk=failed_task_id).first() if failed_task_id else None
    return named or failures.order_by("finished_at").first()


def broadcast_record(
    *, job_id: str, hostname: str, result: dict | None, error: str = ""
) -> Job | None:
    """Record one worker's copy of a broadcast run as the child run ``<id>:<hostname>``.

    Every worker receives the same task id from the fanout exchange; the run keeps
    the last state any of them stored, and each child keeps one worker's.
    """
    parent = Job.objects.filter(pk=job_id).first()
    if parent is None:
        return None
    now = timezone.now()
    child, _ = Job.objects.get_or_create(
        pk=f"{job_id}:{hostname}"[:255],
        defaults={
            "job_type_id": parent.job_type_id, "task_name": parent.task_name,
            "params": parent.params, "options": {**parent.options, "broadcast_of": job_id},
            "source": parent.source, "submitted_by_id": parent.submitted_by_id,
            "workflow_id": job_id, "queue": parent.queue, "priority": parent.priority,
            "sent_at": parent.sent_at or now, "received_at": now,
        },
    )  # fmt: skip
    if result is None and not error:
        fields = {"state": JobState.STARTED, "started_at": now, "worker": hostname}
    elif error:
        fields = {"state": JobState.FAILURE, "finished_at": now, "error_message": error}
    else:
        fields = {"state": JobState.SUCCESS, "finished_at": now, "result": result}
    Job.objects.filter(pk=child.pk).update(**fields)
    return child
