"""Control of runs: cancel, terminate, retry, rerun, delete, in bulk too."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from celery import current_app
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from jobs import markers
from jobs.models import (
    FINISHED_STATES,
    NOT_STARTED_STATES,
    RETRYABLE_STATES,
    AuditAction,
    AuditOutcome,
    Job,
    JobSource,
    JobState,
)
from jobs.selectors.runs import jobs_unfinished_by_task
from jobs.services.audit import _audit_job, audit_record
from jobs.services.errors import BROKER_ERRORS, ActionError
from jobs.services.fleet import task_names_controllable
from jobs.services.runs import job_submit

logger = logging.getLogger(__name__)

# --- Control: cancel, terminate, retry, rerun, delete ---------------------------


NOT_STARTED = NOT_STARTED_STATES


def _is_now(job: Job) -> str:
    return f"this one is {job.get_state_display().lower()}."


def _check_control(user, job: Job) -> None:
    is_owner = job.submitted_by_id == getattr(user, "pk", None)
    if not (is_owner or user.has_perm("jobs.control_jobs")):
        raise PermissionDenied("You may not control this run.")


def job_cancel(*, job: Job, user) -> Job:
    """Cancel a run that has not started: it will never execute, wherever it is delivered.

    A running job is not touched (use ``job_terminate``).
    """
    _check_control(user, job)
    now = timezone.now()
    updated = Job.objects.filter(pk=job.pk, state__in=NOT_STARTED).update(
        state=JobState.REVOKED, finished_at=now, error_message=f"Cancelled by {user}"
    )
    if not updated:
        job.refresh_from_db()
        _audit_job(user, AuditAction.CANCEL, job, AuditOutcome.FAILED, state=job.state)
        raise ActionError("Only a run that has not started can be cancelled; " + _is_now(job))
    markers.mark_revoked(job.pk)
    _broadcast_revoke(job.pk)
    job.refresh_from_db()
    _audit_job(user, AuditAction.CANCEL, job)
    return job


TERMINATE_FOLLOWUP = "jobsite.terminate_followup"  # SIGKILL if still running after grace


def job_terminate(*, job: Job, user, grace: int = 10) -> Job:
    """Stop a running job: SIGTERM now, SIGKILL after ``grace`` seconds if still running."""
    _check_control(user, job)
    if job.state not in (JobState.STARTED, JobState.PROGRESS):
        _audit_job(user, AuditAction.TERMINATE, job, AuditOutcome.FAILED, state=job.state)
        raise ActionError("Only a running job can be terminated; " + _is_now(job))
    markers.mark_revoked(job.pk)
    _broadcast_revoke(job.pk, terminate=True, signal="SIGTERM")
    try:
        # By name: the task lives with the worker's tasks (jobs.tasks.maintenance).
        current_app.send_task(TERMINATE_FOLLOWUP, args=[job.pk], countdown=grace, queue="default")
    except BROKER_ERRORS:
        logger.warning("Could not schedule the SIGKILL follow-up for %s", job.pk)
    _audit_job(user, AuditAction.TERMINATE, job, grace=grace)
    return job


def _broadcast_revoke(task_id: str, **kwargs) -> None:

    try:
        current_app.control.revoke(task_id, **kwargs)
    except BROKER_ERRORS as exc:
        # The Redis marker still stops the run; only the in-memory revoke was missed.
        logger.warning("Could not broadcast revoke of %s: %s", task_id, exc)


def job_retry(*, job: Job, user) -> Job:
    """A new run with the same parameters and options, linked to the original."""
    _check_control(user, job)
    if job.state not in RETRYABLE_STATES:
        raise ActionError("Only a failed, cancelled or lost run can be retried; " + _is_now(job))
    _refuse_resend(job)
    new = _resubmit(job=job, user=user, params=job.params, source=JobSource.RETRY)
    _audit_job(user, AuditAction.RETRY, job, new_run=new.pk)
    return new


def job_rerun(*, job: Job, user, params: dict, options: dict | None = None) -> Job:
    """A new run with edited (already validated) parameters; the lineage is kept."""
    _check_control(user, job)
    _refuse_resend(job)
    assert job.job_type is not None  # refused above
    new = job_submit(
        job_type=job.job_type,
        params=params,
        user=user,
        options=options,
        source=JobSource.RERUN,
        parent=job,
    )
    _audit_job(user, AuditAction.RERUN, job, new_run=new.pk)
    return new


def _refuse_resend(job: Job) -> None:
    if job.job_type is None:
        raise ActionError("This run's task is not in the catalogue, so it cannot be sent again.")
    if job.source == JobSource.EVENTS:
        raise ActionError(
            "This run was seen through another worker's events: its parameters are what "
            "the events showed (masked), not ones Jobsite can send again. Submit it anew."
        )


def _resubmit(*, job: Job, user, params: dict, source: str) -> Job:
    assert job.job_type is not None  # the caller refused a run without one
    options = {
        "queue": job.options.get("queue"),
        "priority": job.options.get("priority"),
        "max_retries": job.options.get("max_retries"),
    }
    # An operator may retry a run of a job type they may not submit themselves.
    return job_submit(
        job_type=job.job_type,
        params=params,
        user=user,
        options=options,
        source=source,
        parent=job,
        check_permission=not user.has_perm("jobs.control_jobs"),
    )


def job_delete(*, job: Job, user) -> None:
    _check_control(user, job)
    if not job.is_finished:
        raise ActionError("Only a finished run can be deleted; cancel it first.")
    _audit_job(user, AuditAction.DELETE, job, task_name=job.task_name, state=job.state)
    job.delete()


BULK_ACTIONS = {"cancel": job_cancel, "retry": job_retry, "delete": job_delete}


def job_bulk(*, action: str, jobs, user) -> tuple[int, list[str]]:
    """Apply one action to many runs; returns (how many succeeded, error messages)."""
    func = BULK_ACTIONS[action]
    done, errors = 0, []
    for job in jobs:
        try:
            func(job=job, user=user)
        except (ActionError, PermissionDenied) as exc:
            errors.append(f"{job.pk}: {exc}")
        else:
            done += 1
    return done, errors


def workflow_cancel(*, root: Job, user) -> tuple[list[str], list[str]]:
    """Cancel every unfinished step (``job_cancel``); returns (cancelled ids, errors).

    A step already running is not stopped (terminate it from its page); the steps
    after it are cancelled, so the workflow goes no further.
    """

    _check_control(user, root)
    steps = Job.objects.filter(workflow_id=root.pk).exclude(state__in=FINISHED_STATES)
    cancelled, errors = [], []
    for step in steps.order_by("created_at", "id"):
        try:
            job_cancel(job=step, user=user)
        except (ActionError, PermissionDenied) as exc:
            errors.append(f"{step.options.get('workflow', {}).get('label', step.pk)}: {exc}")
        else:
            cancelled.append(step.pk)
    audit_record(
        actor=user, action=AuditAction.CANCEL, target_type="workflow", target_id=root.pk,
        target_repr=root.options.get("workflow", {}).get("title", ""),
        details={"cancelled": cancelled, "not_cancelled": errors},
    )  # fmt: skip
    return cancelled, errors


# --- Cancel by task name ---------------------------------------------------------------

# Runs cancelled per transaction (and per revoke broadcast): a batch locks its rows only
# as long as one UPDATE takes, and a revoke message stays small.
REVOKE_BATCH = 500
REVOKE_AUDIT_IDS = 1000  # run ids kept in the audit entry (the count is always exact)


@dataclass
class RevokeByName:
    """What ``jobs_revoke_by_name`` did."""

    task_name: str
    cancelled: list[str] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)
    left_running: int = 0
    errors: list[str] = field(default_factory=list)


def jobs_revoke_by_name(*, task_name: str, user, terminate: bool = False) -> RevokeByName:
    """Cancel every run of ``task_name`` that has not started and that ``user`` can see.

    Celery 5 has no revoke by name: the runs are chosen in the Job table and revoked by
    id (Redis marker + Celery revoke, as ``job_cancel``), in batches. Runs already
    running are stopped only with ``terminate`` (``job_terminate``, each audited);
    otherwise they are counted as left running.
    """
    action = AuditAction.REVOKE_BY_NAME
    if not user.has_perm("jobs.control_jobs"):
        audit_record(actor=user, action=action, target_type="task", target_id=task_name[:255],
                     outcome=AuditOutcome.DENIED)  # fmt: skip
        raise PermissionDenied("You may not cancel runs by task name.")
    if task_name not in revocable_task_names(user=user):
        audit_record(actor=user, action=action, target_type="task", target_id=task_name[:255],
                     outcome=AuditOutcome.FAILED, details={"error": "unknown task"})  # fmt: skip
        raise ActionError(f"Unknown task “{task_name}”: choose one of the tasks in the list.")
    runs = Job.objects.visible_to(user).filter(task_name=task_name)
    done = RevokeByName(task_name=task_name, cancelled=_cancel_waiting(runs, user, task_name))
    running = runs.filter(state__in=(JobState.STARTED, JobState.PROGRESS))
    if terminate:
        for job in running.order_by("created_at", "id").iterator():
            try:
                job_terminate(job=job, user=user)
            except (ActionError, PermissionDenied) as exc:  # it finished meanwhile
                done.errors.append(f"{job.pk}: {exc}")
            else:
                done.terminated.append(job.pk)
    else:
        done.left_running = running.count()
    audit_record(
        actor=user, action=action, target_type="task", target_id=task_name,
        details={
            "cancelled": len(done.cancelled), "cancelled_runs": done.cancelled[:REVOKE_AUDIT_IDS],
            "terminated": done.terminated, "left_running": done.left_running,
            "errors": done.errors[:50],
        },
    )  # fmt: skip
    return done


def _cancel_waiting(runs, user, task_name: str) -> list[str]:
    """Cancel the runs of ``runs`` not started yet, batch by batch; their ids."""
    message = f"Cancelled by {user} (every run of {task_name})"
    cancelled: list[str] = []
    while True:
        with transaction.atomic():
            # Locked until the UPDATE commits, so the ids are exactly the rows updated: a
            # run a worker started meanwhile is re-checked by PostgreSQL and left out.
            waiting = runs.filter(state__in=NOT_STARTED).select_for_update()
            ids = list(waiting.values_list("pk", flat=True)[:REVOKE_BATCH])
            if not ids:
                return cancelled
            Job.objects.filter(pk__in=ids).update(
                state=JobState.REVOKED, finished_at=timezone.now(), error_message=message
            )
        for pk in ids:
            markers.mark_revoked(pk)
        try:
            current_app.control.revoke(ids)
        except BROKER_ERRORS as exc:
            # The Redis markers still stop these runs; only the in-memory revoke was missed.
            logger.warning("Could not broadcast revoke of %d runs: %s", len(ids), exc)
        cancelled.extend(ids)


def revocable_task_names(*, user, unfinished: list[dict] | None = None) -> list[str]:
    """The task names one may cancel by: the app's, and those of unfinished runs the user
    sees (runs of other codebases' workers, seen through events). Only matched against
    the history; never sent to workers as a task name. ``unfinished``: the counts of
    ``jobs_unfinished_by_task`` when the caller has them already."""
    if unfinished is None:
        unfinished = jobs_unfinished_by_task(user=user)
    names = set(task_names_controllable())
    names.update(row["task_name"] for row in unfinished if row["task_name"])
    return sorted(names)
