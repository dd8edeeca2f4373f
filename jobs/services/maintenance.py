"""Maintenance: the relay of runs stored while the broker was down, stale runs, retention."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from jobs import heartbeat
from jobs.models import (
    Alert,
    AuditAction,
    Job,
    JobLog,
    JobState,
    JobType,
)
from jobs.services.audit import audit_record
from jobs.services.runs import job_publish

logger = logging.getLogger(__name__)

# --- Relay: publishing runs stored while the broker was down ------------------------


def jobs_relay(*, batch: int = 200, min_age: float = 10.0, limit: int = 10_000) -> int:
    """Publish unsent runs, oldest first; returns how many were sent.

    Rows are locked with ``SELECT … FOR UPDATE SKIP LOCKED`` (PostgreSQL), so two relays
    running at once never send the same run twice; runs younger than ``min_age`` are
    left to the request that stored them (its on-commit publish may still be under way).
    Stops at the first broker fault: the rest waits for the next relay.
    """
    sent = 0
    cutoff = timezone.now() - timedelta(seconds=min_age)
    while sent < limit:
        with transaction.atomic():
            rows = list(
                Job.objects.unsent()
                .filter(created_at__lte=cutoff)
                .order_by("created_at")
                .select_for_update(skip_locked=True)[:batch]
            )
            if not rows:
                return sent
            for job in rows:
                if not job_publish(job=job, force=True):
                    return sent
                sent += 1
    return sent


# --- Stale runs and retention -------------------------------------------------------


def jobs_mark_lost(*, lost_after: int | None = None) -> int:
    """Mark LOST the runs whose worker has sent no heartbeat for ``lost_after`` seconds.

    A LOST run can be retried; if its message is redelivered (acks_late) and it runs
    again, the worker's next transition brings it back from LOST.
    """

    lost_after = lost_after or settings.JOBSITE_LOST_AFTER
    now = timezone.now()
    cutoff = now - timedelta(seconds=lost_after)
    active = Job.objects.filter(
        Q(received_at__lt=cutoff) | Q(started_at__lt=cutoff),
        state__in=[JobState.RECEIVED, JobState.STARTED, JobState.PROGRESS],
    ).exclude(worker="")
    workers = sorted(set(active.values_list("worker", flat=True)))
    seen = heartbeat.worker_last_seen(workers)
    silent = [name for name in workers if (seen.get(name) or cutoff) <= cutoff]
    if not silent:
        return 0
    count = active.filter(worker__in=silent).update(
        state=JobState.LOST,
        finished_at=now,
        error_message=f"The worker stopped sending heartbeats for over {lost_after} s.",
    )
    audit_record(actor=None, action=AuditAction.RUNS_LOST, target_type="worker",
                 target_id=",".join(silent), details={"runs": count})  # fmt: skip
    return count


def jobs_expire(*, grace: int = 60) -> int:
    """Mark cancelled the runs whose expiry passed before they started.

    A worker that receives an expired message records it as revoked, but RabbitMQ may
    drop it first (message TTL) and then no worker ever sees it: without this, such a
    run would stay pending for ever.
    """
    now = timezone.now()
    return Job.objects.filter(
        state__in=[JobState.PENDING, JobState.RECEIVED],
        expires_at__lt=now - timedelta(seconds=grace),
    ).update(state=JobState.REVOKED, finished_at=now, error_message="Expired before it started.")


def jobs_cleanup(*, batch: int = 5000, now=None) -> dict[str, int]:
    """Delete runs (with their logs) and Celery result rows past their retention.

    Works in batches, each in its own short transaction, selecting ids through the
    created_at index: memory stays bounded by the batch size and no lock is held for
    long, however many rows are due (the problem django-celery-results' own cleanup has
    with a single huge DELETE).
    """
    from django_celery_results.models import TaskResult

    now = now or timezone.now()
    deleted = {"runs": 0, "task_results": 0}
    for job_types, days in _retention_groups():
        queryset = Job.objects.filter(created_at__lt=now - timedelta(days=days))
        queryset = (
            queryset.filter(job_type__in=job_types)
            if job_types
            else queryset.exclude(job_type__retention_days__isnull=False)
        )
        while ids := list(queryset.order_by("created_at").values_list("pk", flat=True)[:batch]):
            with transaction.atomic():
                _delete_runs(ids)
                deleted["task_results"] += TaskResult.objects.filter(task_id__in=ids).delete()[0]
            deleted["runs"] += len(ids)
    cutoff = now - timedelta(days=settings.JOBSITE_RETENTION_DAYS)
    results = TaskResult.objects.filter(date_done__lt=cutoff)
    while ids := list(results.values_list("pk", flat=True)[:batch]):
        deleted["task_results"] += TaskResult.objects.filter(pk__in=ids).delete()[0]
    return deleted


def _retention_groups() -> list[tuple[list[int], int]]:
    """[(job type ids, days)]: one group per override, then everything else ([])."""
    overrides: dict[int, list[int]] = {}
    for pk, days in JobType.objects.filter(retention_days__isnull=False).values_list(
        "pk", "retention_days"
    ):
        overrides.setdefault(days, []).append(pk)
    return [(pks, days) for days, pks in overrides.items()] + [
        ([], settings.JOBSITE_RETENTION_DAYS)
    ]


def _delete_runs(ids: list[str]) -> None:

    JobLog.objects.filter(job_id__in=ids).delete()
    Job.objects.filter(parent_id__in=ids).update(parent=None)
    Alert.objects.filter(job_id__in=ids).update(job=None)
    # Relations are cleared above, so a plain DELETE is safe; Django's collector would
    # load every row (and its relations) into memory first.
    Job.objects.filter(pk__in=ids)._raw_delete(Job.objects.db)
