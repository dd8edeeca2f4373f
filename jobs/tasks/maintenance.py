"""Jobsite's own maintenance tasks: not job types, named jobsite.*, never shown as runs."""

from __future__ import annotations

import logging

from celery import shared_task

from jobs.models import FINISHED_STATES, Job
from jobs.services import alerts, jobs_cleanup, jobs_expire, jobs_mark_lost, jobs_relay

logger = logging.getLogger(__name__)


@shared_task(name="jobsite.terminate_followup", ignore_result=True)
def terminate_followup(job_id: str) -> None:
    """SIGKILL a terminated run that did not stop within its grace period."""
    state = Job.objects.filter(pk=job_id).values_list("state", flat=True).first()
    if state is not None and state not in FINISHED_STATES:
        logger.warning("Run %s ignored SIGTERM; sending SIGKILL", job_id)
        terminate_followup.app.control.revoke(job_id, terminate=True, signal="SIGKILL")


@shared_task(name="jobsite.alerts_check", ignore_result=True)
def alerts_check() -> None:
    """Alert on runs that failed, schedules that missed, beat or workers gone silent."""
    result = alerts.alerts_check()
    if result.raised or result.folded:
        logger.info("Alerts: %d raised, %d folded", result.raised, result.folded)


@shared_task(name="jobsite.relay", ignore_result=True)
def relay() -> int:
    """Publish runs that were stored while the broker was down."""
    return jobs_relay()


@shared_task(name="jobsite.mark_lost", ignore_result=True)
def mark_lost() -> int:
    """Runs whose worker went silent become LOST; runs that expired unstarted, cancelled."""
    return jobs_mark_lost() + jobs_expire()


@shared_task(name="jobsite.cleanup", ignore_result=True)
def cleanup() -> dict:
    return jobs_cleanup()
