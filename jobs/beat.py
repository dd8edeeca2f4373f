"""The one beat: django-celery-beat's DatabaseScheduler behind a lock in Redis.

Two beats against the same database would send every schedule twice. So every tick
the scheduler holds or renews a lock in Redis (redis-py's ``Lock``: an owner token
and a TTL, renewed and released only by its owner). A beat that finds the lock held
by another stays on standby: it keeps ticking, sends nothing, and takes over within
one TTL when the active beat stops (at once, if that one stopped cleanly and released
the lock). The active beat marks its heartbeat every tick, for the schedule admin.

    celery -A jobsite beat -S jobs.beat:JobsiteScheduler   (the CELERY_BEAT_SCHEDULER default)

It also refuses to send a schedule whose task is not in the catalogue (or Celery's
and Jobsite's own), or whose headers would overwrite Celery's protocol headers:
schedules typed in elsewhere than the admin must not run arbitrary tasks.
"""

from __future__ import annotations

import contextlib
import logging
import time

from django.conf import settings
from django.db import (
    DatabaseError,
    InterfaceError,
    close_old_connections,
    connection,
    transaction,
)
from django_celery_beat.schedulers import DatabaseScheduler
from redis.exceptions import LockError, RedisError

from jobs import catalog, guard, heartbeat

logger = logging.getLogger(__name__)

LOCK_NAME = "jobsite:beat:lock"
BUILT_IN_PREFIXES = ("celery.", "jobsite.")
# Celery's task message headers (protocol 2): a schedule's headers must not replace them.
RESERVED_HEADERS = frozenset(
    {
        "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index",
        "retries", "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr",
        "origin", "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps",
        "periodic_task_name",
    }
)  # fmt: skip


def reserved_headers(headers: dict) -> list[str]:
    """The keys of ``headers`` that would replace Celery's or Jobsite's own headers."""
    return sorted(key for key in headers if key in RESERVED_HEADERS or key.startswith("jobsite_"))


def refusal(task_name: str, headers: dict) -> str | None:
    """Why beat must not send this task with these headers (None: it may)."""
    if not (catalog.by_task_name(task_name) or task_name.startswith(BUILT_IN_PREFIXES)):
        return f"the task {task_name!r} is not in the catalogue"
    # Beat itself adds periodic_task_name to every schedule's headers.
    bad = [key for key in reserved_headers(headers) if key != "periodic_task_name"]
    if bad:
        return f"its headers would replace Celery's: {', '.join(bad)}"
    return None


class JobsiteScheduler(DatabaseScheduler):
    """DatabaseScheduler that fires only while it holds the beat lock."""

    # Write last run times and counts every 10 s (Celery's default is 3 minutes), so
    # that the schedule admin's "last run" and "total runs" are nearly current.
    sync_every = 10
    # Celery ticks once per task it sends. With thousands of schedules due at once,
    # renewing the lock, marking the heartbeat and asking the database whether the
    # schedules changed on every tick made beat seconds late: at most once per this
    # many seconds instead (far within the lock's TTL).
    check_every = 1.0

    def __init__(self, *args, **kwargs) -> None:
        self.lock_ttl: int = settings.JOBSITE_BEAT_LOCK_TTL
        # thread_local=False: beat's sync at shutdown may run outside the ticking thread.
        self._lock = guard.client().lock(LOCK_NAME, timeout=self.lock_ttl, thread_local=False)
        self._role: str | None = None  # "active" or "standby", for logging transitions
        self._held_at = self._changes_checked_at = float("-inf")
        super().__init__(*args, **kwargs)

    @property
    def renew_every(self) -> float:
        """Sleep at most this long, so the lock is renewed well within its TTL."""
        return self.lock_ttl / 3

    def tick(self, *args, **kwargs) -> float:
        now = time.monotonic()
        if self._role != "active" or now - self._held_at >= self.check_every:
            if not self._hold_lock():
                return self.renew_every
            heartbeat.beat_seen_now()
            self._held_at = now
        return min(super().tick(*args, **kwargs), self.renew_every)

    def schedule_changed(self) -> bool:
        now = time.monotonic()
        if now - self._changes_checked_at < self.check_every:
            return False
        self._changes_checked_at = now
        return super().schedule_changed()

    def schedules_equal(self, *args, **kwargs) -> bool:
        # Celery compares every entry with its copy on every tick, O(schedules) per
        # task sent. Here the schedule only changes by a reload from the database,
        # which flags the heap invalid (DatabaseScheduler._heap_invalidated).
        if self._heap_invalidated:
            self._heap_invalidated = False
            return False
        return True

    def sync(self) -> None:
        """Store the sent entries' last run time and run count in one batch.

        DatabaseScheduler saves each entry on its own (three queries each), which
        stalled beat for seconds when thousands were sent between two syncs (and
        Django's bulk_update spends as long building its CASE expressions). Like its
        save, only the two fields beat owns are written, and no change is signalled.
        """
        if not self._dirty:
            return
        names = list(self._dirty)
        when = connection.ops.adapt_datetimefield_value  # as the ORM stores it (SQLite: UTC)
        rows = [
            (when(entry.model.last_run_at), entry.model.total_run_count, entry.model.pk)
            for entry in (self._schedule.get(name) for name in names)
            if entry is not None
        ]
        try:
            close_old_connections()
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.executemany(_sync_sql(), rows)  # psycopg pipelines these
        except (DatabaseError, InterfaceError) as exc:
            logger.warning("Could not store last run times (next sync retries): %s", exc)
            return
        self._dirty.difference_update(names)

    def apply_entry(self, entry, producer=None) -> None:
        reason = refusal(entry.task, entry.options.get("headers") or {})
        if reason:
            logger.error("Schedule %r is not sent: %s.", entry.name, reason)
            return
        super().apply_entry(entry, producer=producer)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._role == "active":
                # Released at once so that a standby beat need not wait for the TTL.
                with contextlib.suppress(LockError, RedisError):
                    self._lock.release()

    def _hold_lock(self) -> bool:
        try:
            if self._role == "active":
                self._lock.reacquire()
                return True
            if self._lock.acquire(blocking=False):
                self._become_active()
                return True
        except LockError as exc:
            logger.warning("This beat lost the beat lock (%s).", exc)
        except RedisError as exc:
            # Without the lock we cannot know that no other beat fires: send nothing.
            logger.error("Redis is unreachable, so this beat sends nothing: %s", exc)
        self._become_standby()
        return False

    def _become_active(self) -> None:
        logger.info(
            "This beat holds the beat lock %r: it is active, it sends schedules.", LOCK_NAME
        )
        self._role = "active"
        # The schedule read while on standby is stale (another beat ran it since):
        # read it afresh, last run times included.
        self._schedule = self.all_as_schedule()
        self._heap = None

    def _become_standby(self) -> None:
        if self._role != "standby":
            logger.warning(
                "Another beat holds the beat lock %r: this beat is on standby and sends "
                "nothing (it takes over if the other one stops).",
                LOCK_NAME,
            )
        self._role = "standby"


def _sync_sql() -> str:
    """UPDATE of one schedule's last run time and count (names from the model's metadata)."""
    from django_celery_beat.models import PeriodicTask

    meta, quote = PeriodicTask._meta, connection.ops.quote_name
    table, pk = quote(meta.db_table), quote(meta.pk.column)
    last, count = (quote(meta.get_field(f).column) for f in ("last_run_at", "total_run_count"))
    return f"UPDATE {table} SET {last} = %s, {count} = %s WHERE {pk} = %s"  # noqa: S608
