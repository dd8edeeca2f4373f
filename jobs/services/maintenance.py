"""Maintenance: the relay of runs stored while the broker was down, stale runs, retention."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import cast

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from kombu.utils.encoding import bytes_to_str

from jobs import heartbeat, markers
from jobs.models import (
    Alert,
    AuditAction,
    Job,
    JobLog,
    JobSource,
    JobState,
    JobType,
)
from jobs.redis import client
from jobs.selectors.broker import redis_run_ids_on_broker
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
    again, the worker's next transition brings it back from LOST. First, runs whose
    marker is held by a worker incarnation that is gone are delivered again (or marked
    LOST) whatever their worker's name does (jobs_reclaim_orphans). Returns how many
    runs it marked LOST or delivered again.
    """

    lost_after = lost_after or settings.JOBSITE_LOST_AFTER
    return jobs_reclaim_orphans() + _mark_silent_workers_lost(lost_after) + jobs_resend_vanished()


def _mark_silent_workers_lost(lost_after: int) -> int:
    now = timezone.now()
    cutoff = now - timedelta(seconds=lost_after)
    active = (
        Job.objects.filter(
            Q(received_at__lt=cutoff) | Q(started_at__lt=cutoff),
            state__in=[JobState.RECEIVED, JobState.STARTED, JobState.PROGRESS],
        )
        .exclude(worker="")
        # Not Jobsite's workers: the recorder judges them (events_mark_silent_workers_lost).
        .exclude(source=JobSource.EVENTS)
    )
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


ORPHAN_SCAN_LIMIT = 10_000  # unfinished runs looked at per pass (in flight: few)


def jobs_reclaim_orphans(*, limit: int = ORPHAN_SCAN_LIMIT) -> int:
    """Deliver again the unfinished runs whose guard marker's holder no longer exists.

    A run's marker names the worker incarnation and process executing it
    (jobs.markers); that incarnation's heartbeat key (jobs.heartbeat) outlives it by
    at most INCARNATION_TTL. A delivery met while the holder still seemed alive was
    skipped (and acknowledged), so if the holder then died the run would wait for
    ever: its worker's name may well be heartbeating again, restarted by a supervisor.
    The dead holder's marker is dropped (compare-and-delete: unless someone took it
    over meanwhile) and the run published again; the guard lets one delivery run it.
    Workflow steps and runs Jobsite cannot republish as they were are marked LOST
    instead (retry from the run's page). Returns how many runs it handled.
    """
    rows = list(
        Job.objects.filter(state__in=[JobState.RECEIVED, JobState.STARTED, JobState.PROGRESS])
        .order_by()
        .values_list("pk", flat=True)[:limit]
    )
    if not rows:
        return 0
    values = cast(list[bytes | None], client().mget([markers.key(pk) for pk in rows]))
    held: list[tuple[str, bytes, tuple[str, str, int]]] = []
    for pk, value in zip(rows, values, strict=True):
        holder = markers.holder(value) if value else None
        if value and holder:
            held.append((pk, value, holder))
    alive = heartbeat.holders_alive([(instance, pid) for _, _, (_, instance, pid) in held])
    orphans = {pk: (value, holder) for (pk, value, holder), ok in zip(held, alive, strict=True)
               if not ok}  # fmt: skip
    handled = 0
    for job in Job.objects.filter(pk__in=list(orphans)):
        value, (worker, instance, pid) = orphans[job.pk]
        if not markers.compare_and_delete(job.pk, value):
            continue  # taken over (or finished) since: it is running again
        where = f"{worker} (incarnation {instance}, process {pid})"
        again = job.source != JobSource.WORKFLOW and "_args" not in job.params
        if again and job_publish(job=job, force=True, mark_sent=False):
            message = f"The worker process running this run is gone: {where}; delivered it again."
        else:
            Job.objects.filter(pk=job.pk, state__in=[JobState.RECEIVED, JobState.STARTED,
                                                     JobState.PROGRESS]).update(
                state=JobState.LOST,
                finished_at=timezone.now(),
                error_message=f"The worker process running this run is gone: {where}.",
            )  # fmt: skip
            message = f"The worker process running this run is gone: {where}; marked LOST."
        JobLog.objects.create(job_id=job.pk, created_at=timezone.now(), level="WARNING",
                              logger="jobsite.guard", message=message)  # fmt: skip
        logger.warning("Run %s: %s", job.pk, message)
        handled += 1
    if handled:
        audit_record(actor=None, action=AuditAction.RUNS_LOST, target_type="incarnation",
                     target_id=",".join(sorted({h[1] for _, h in orphans.values()})),
                     details={"runs": handled})  # fmt: skip
    return handled


VANISHED = "jobsite:vanished"  # hash: run id -> when it was first seen gone (epoch s)
VANISHED_CONFIRM = 2.0  # seconds between the two looks that must both miss a run
VANISHED_SCAN_LIMIT = 5_000  # candidate runs looked at per pass


def jobs_resend_vanished(*, after: int | None = None, limit: int = VANISHED_SCAN_LIMIT) -> int:
    """Publish again the runs a Redis broker lost before any worker received them.

    kombu's Redis transport pops a message (BRPOP) and only then stores it as
    unacknowledged (kombu#305): a consumer killed in between, or a reply lost when the
    server restarts, loses the message, and its run would stay *pending* for ever. A
    run sent over ``after`` seconds ago (JOBSITE_REDIS_RESEND_AFTER) that no worker has
    received, and whose message is in none of its queue's lists nor in kombu's
    unacknowledged hash in two looks at least VANISHED_CONFIRM seconds apart, is
    published again (at least once). Only runs routed straight to a queue: a fanout
    run's message never waits in a list. Returns how many it sent again.
    """
    after = settings.JOBSITE_REDIS_RESEND_AFTER if after is None else after
    cutoff = timezone.now() - timedelta(seconds=after)
    rows = (
        Job.objects.filter(state=JobState.PENDING, sent_at__lt=cutoff, received_at__isnull=True)
        .exclude(queue="")
        .exclude(source__in=[JobSource.WORKFLOW, JobSource.EVENTS])  # not Jobsite's to send
        .order_by()
        .values_list("pk", "queue", "options")[:limit]
    )
    # Options hold every routing key, most of them empty: a run routed by exchange is
    # one whose route or exchange is set.
    candidates = {
        pk: queue for pk, queue, options in rows
        if not (options or {}).get("route") and not (options or {}).get("exchange")
    }  # fmt: skip
    redis = client()
    if not candidates:
        redis.delete(VANISHED)
        return 0
    present = redis_run_ids_on_broker(set(candidates.values()))
    if present is None:  # not Redis, unreadable, or too long a backlog to tell
        return 0
    now = time.time()
    first_gone = {bytes_to_str(k): float(v) for k, v in redis.hgetall(VANISHED).items()}
    gone = [pk for pk in candidates if pk not in present]
    confirmed = [pk for pk in gone if now - first_gone.get(pk, now) >= VANISHED_CONFIRM]
    with redis.pipeline() as pipe:
        pipe.delete(VANISHED)
        fresh = {pk: first_gone.get(pk, now) for pk in gone if pk not in confirmed}
        if fresh:
            pipe.hset(VANISHED, mapping=fresh)
            pipe.expire(VANISHED, 24 * 3600)
        pipe.execute()
    resent = 0
    # Looked at again after the broker: a worker may have received it meanwhile.
    still_pending = Job.objects.filter(
        pk__in=confirmed, state=JobState.PENDING, received_at__isnull=True
    ).exclude(params__has_key="_args")
    for job in still_pending:
        if not job_publish(job=job, force=True, mark_sent=False):
            break
        Job.objects.filter(pk=job.pk).update(sent_at=timezone.now())
        message = "The broker lost this run's message before any worker received it; sent it again."
        JobLog.objects.create(job_id=job.pk, created_at=timezone.now(), level="WARNING",
                              logger="jobsite.relay", message=message)  # fmt: skip
        logger.warning("Run %s: %s", job.pk, message)
        resent += 1
    return resent


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
