"""The one beat: django-celery-beat's DatabaseScheduler behind a lock in Redis.

Two beats against the same database would send every schedule twice. So every tick
the scheduler holds or renews a lock in Redis (redis-py's ``Lock``: an owner token
and a TTL, renewed and released only by its owner). A beat that finds the lock held
by another stays on standby: it keeps ticking, sends nothing, and takes over within
one TTL when the active beat stops (at once, if that one stopped cleanly and released
the lock). The active beat marks its heartbeat every tick, for the schedule admin.

    celery -A jobsite beat -S jobs.beat:JobsiteScheduler   (the CELERY_BEAT_SCHEDULER default)

Thousands of schedules due in the same second (every crontab at ``* * * * *``) take
beat seconds to publish one by one, so the last ones went out seconds late. Beat
therefore sends each recurring run up to JOBSITE_BEAT_LEAD seconds ahead, as a
message with an ETA of its due time: the worker holds it and starts it no earlier
than the due time, and a burst is published before it is due rather than after.
At most one run per schedule is sent ahead (the next one only once the previous one
is due); interval and crontab runs only: one-off, clocked, solar and not-yet-started
schedules never are. The run's expiry counts from its due time. When beat re-reads
the schedules (within seconds of a change), it cancels the run sent ahead of a
schedule since disabled, deleted or edited, if that run is not due yet.
JOBSITE_BEAT_LEAD=0 turns sending ahead off.

It also refuses to send a schedule whose task is not in the catalogue (or Celery's
and Jobsite's own), or whose headers would overwrite Celery's protocol headers:
schedules typed in elsewhere than the admin must not run arbitrary tasks.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import logging
import time
from typing import NamedTuple

from celery.beat import event_t
from celery.schedules import schedstate
from celery.utils.time import maybe_make_aware
from django.conf import settings
from django.db import (
    DatabaseError,
    InterfaceError,
    close_old_connections,
    connection,
    transaction,
)
from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry
from redis.exceptions import LockError, RedisError

from jobs import heartbeat, markers, redis, specs
from jobs.services.messages import header_refusal

logger = logging.getLogger(__name__)

LOCK_NAME = "jobsite:beat:lock"
BUILT_IN_PREFIXES = ("celery.", "jobsite.")


def refusal(task_name: str, headers: dict) -> str | None:
    """Why beat must not send this task with these headers (None: it may)."""
    spec = specs.by_task_name(task_name)
    if not (spec or task_name.startswith(BUILT_IN_PREFIXES)):
        return f"the task {task_name!r} is not in the catalogue"
    if spec is not None and spec.internal:
        # Written into the table by other means than the admin, which refuses it.
        return f"the job type {spec.name!r} is internal: only Jobsite sends it"
    return header_refusal(headers)


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
    _heap_invalidated: bool  # DatabaseScheduler's: set when it reloads the schedule

    def __init__(self, *args, **kwargs) -> None:
        self.lock_ttl: int = settings.JOBSITE_BEAT_LOCK_TTL
        # thread_local=False: beat's sync at shutdown may run outside the ticking thread.
        self._lock = redis.client().lock(LOCK_NAME, timeout=self.lock_ttl, thread_local=False)
        self._role: str | None = None  # "active" or "standby", for logging transitions
        self._role_since = time.time()  # when it took its role (for the pages)
        self._sent_at: float | None = None  # when it last sent a run
        self._held_at = self._changes_checked_at = float("-inf")
        self.lead: float = settings.JOBSITE_BEAT_LEAD
        # name -> the due time of the run being sent ahead (set by is_due, used by
        # reserve and apply_entry, which Celery's tick calls right after it).
        self._due_ahead: dict[str, datetime.datetime] = {}
        # name -> the run sent ahead and not due yet, and what its schedule was then.
        self._sent_ahead: dict[str, SentAhead] = {}
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        super().setup_schedule()
        # Saving the default entries (Celery's and CELERY_BEAT_SCHEDULE's) has just
        # marked the schedules changed. That change is ours, and in the schedule read
        # already: noted as seen, so that the first ticks do not read every schedule
        # again (4 s at 10,000), while the runs due right after start-up wait.
        try:
            self._last_timestamp = self.Changes.last_change()
        except DatabaseError as exc:
            logger.warning("Could not read the schedules' change time: %s", exc)

    @property
    def renew_every(self) -> float:
        """Sleep at most this long, so the lock is renewed well within its TTL."""
        return self.lock_ttl / 3

    def tick(self, *args, **kwargs) -> float:
        now = time.monotonic()
        if self._role != "active" or now - self._held_at >= self.check_every:
            if not self._hold_lock():
                self._report()
                return self.renew_every
            heartbeat.beat_seen_now()
            self._report()
            self._held_at = now
        return min(super().tick(*args, **kwargs), self.renew_every)

    def _report(self) -> None:
        """Tell the pages this beat's role (jobs.heartbeat.beat_report)."""
        try:
            heartbeat.beat_report(self._role or "standby", self._role_since, self._sent_at)
        except RedisError as exc:  # without Redis it sends nothing anyway (_hold_lock)
            logger.debug("Could not report this beat: %s", exc)

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

    def is_due(self, entry) -> schedstate:
        """Celery's is_due, except that a run due within the lead counts as due now.

        Otherwise the returned delay is shortened by the lead, so that the tick wakes
        up in time to send the next run ahead. When sent ahead, the delay is until
        the next run may be sent ahead: the lead before it, not before this run's due.
        """
        state = entry.is_due()
        self._due_ahead.pop(entry.name, None)
        if not self.lead:
            return state
        wait = self._ahead_wait(entry)
        if wait is None:
            return state
        if state.is_due:  # due already: sent now, and the next run may go ahead
            return schedstate(True, max(state.next - self.lead, 0.02))
        if wait > 0:  # its last run, sent ahead, is not due yet: look again when it is
            return schedstate(False, min(state.next, wait + 0.02))
        if state.next > self.lead + 1:  # far off: no need for the exact due time yet
            return schedstate(False, state.next - self.lead)
        now, due, following = _next_runs(entry)
        if (expires := entry.model.expires) and due >= expires:
            return state  # the schedule ends before this run: let it expire as usual
        ahead = (due - now).total_seconds()
        if ahead > self.lead:
            return schedstate(False, ahead - self.lead)
        self._due_ahead[entry.name] = due
        # Look again once this run is due (+20 ms: the heap wakes 10 ms early).
        next_check = max(
            due + datetime.timedelta(seconds=0.02),
            following - datetime.timedelta(seconds=self.lead),
        )
        return schedstate(True, max((next_check - now).total_seconds(), 0.0))

    def reserve(self, entry):
        due = self._due_ahead.get(entry.name)
        new_entry = super().reserve(entry)
        if due is not None:
            # The run sent is the one due at `due`: counting from the send time
            # instead would send an interval early forever, and a crontab twice.
            new_entry.model.last_run_at = new_entry.last_run_at = due
        # DatabaseScheduler keeps the entry it read in its schedule, with the last run
        # time of then. When the heap is rebuilt from that schedule without a new read
        # (it is, once more, on the tick after a reload), the entry looked due again and
        # was sent twice. Keep the schedule's entry current, as Celery's own reserve does.
        current = self._schedule.get(entry.name) if self._schedule else None
        if current is not None and current.model is new_entry.model:
            self._schedule[entry.name] = new_entry
        return new_entry

    def apply_entry(self, entry, producer=None) -> None:
        due = self._due_ahead.pop(entry.name, None)
        reason = refusal(entry.task, entry.options.get("headers") or {})
        if reason:
            logger.error("Schedule %r is not sent: %s.", entry.name, reason)
            return
        spec = specs.by_task_name(entry.task)
        if spec is not None and spec.secret_fields:
            # What Celery's logs, inspect and TaskResult show instead of the kwargs.
            masked = repr(spec.mask(entry.kwargs or {}))
            entry.options = {**entry.options, "kwargsrepr": masked}
        if due is not None:
            entry.options = {**entry.options, "eta": due}
            expires = entry.options.get("expires")
            if isinstance(expires, int | float):  # seconds after the due time, not now
                entry.options["expires"] = due + datetime.timedelta(seconds=expires)
        super().apply_entry(entry, producer=producer)

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        result = super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        self._sent_at = time.time()
        eta = entry.options.get("eta")
        if eta is not None and result is not None:
            self._sent_ahead[entry.name] = SentAhead(
                result.id, eta, entry.model.date_changed, entry.schedule
            )
        return result

    def all_as_schedule(self) -> dict:
        schedule = super().all_as_schedule()
        self._cancel_outdated_runs(schedule)
        return schedule

    def _cancel_outdated_runs(self, schedule: dict) -> None:
        """Cancel the runs sent ahead whose schedule was since disabled, deleted or edited.

        Beat re-reads the schedules within seconds of a change; a run sent ahead is not
        started before its due time, so one not yet due can still be cancelled (the
        workers skip a revoked run and record it as such).
        """
        now = datetime.datetime.now(datetime.UTC)
        for name, sent in list(self._sent_ahead.items()):
            if sent.due <= now:  # due: a worker may have started it
                del self._sent_ahead[name]
                continue
            entry = schedule.get(name)
            if (
                entry is not None
                and entry.model.date_changed == sent.changed_at
                and entry.schedule == sent.schedule
            ):
                continue
            try:
                markers.mark_revoked(sent.task_id)
            except RedisError as exc:
                logger.warning("Could not cancel the run sent ahead for %r: %s", name, exc)
                continue
            del self._sent_ahead[name]
            logger.info(
                "Schedule %r was %s: its run due at %s (sent ahead, %s) is cancelled.",
                name, "disabled or deleted" if entry is None else "changed",
                sent.due.isoformat(), sent.task_id,
            )  # fmt: skip

    def _ahead_wait(self, entry) -> float | None:
        """Seconds until this entry's next run may be sent ahead (None: never)."""
        if not isinstance(entry, ModelEntry):
            return None
        model = entry.model
        if not model.enabled or model.one_off or model.clocked_id is not None:
            return None
        if model.solar_id is not None:
            # A solar event is a float from ephem: the "next" event searched from it
            # might be itself. Solar runs are sent when due, as Celery does.
            return None
        now = entry.default_now()
        if model.start_time is not None and maybe_make_aware(model.start_time) > now:
            return None
        # One run per schedule ahead at most: the last one sent must be due already.
        outstanding = maybe_make_aware(entry.last_run_at) - maybe_make_aware(now)
        return max(outstanding.total_seconds(), 0.0)

    def populate_heap(self, event_t=event_t, heapify=heapq.heapify) -> None:
        """Celery's, but asking our is_due: a run due within the lead right after
        start-up or a reload is sent ahead too."""
        self._heap = []
        for entry in self.schedule.values():
            try:
                is_due, delay = self.is_due(entry)
            except Exception:  # as Celery's: one broken entry must not stop beat
                is_due, delay = self._is_due_failed(entry)
            self._heap.append(event_t(self._when(entry, 0 if is_due else delay) or 0, 5, entry))
        heapify(self._heap)
        self._due_ahead.clear()  # the tick asks is_due again before it sends

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._role == "active":
                # Released at once so that a standby beat need not wait for the TTL.
                with contextlib.suppress(LockError, RedisError):
                    self._lock.release()
            with contextlib.suppress(RedisError):
                heartbeat.beat_gone()  # the pages stop listing it

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
        # The schedule read while on standby is stale (another beat ran it since):
        # read it afresh, last run times included. (Read at start-up, it is fresh.)
        if self._role == "standby":
            self._schedule = self.all_as_schedule()
            # None is Celery's own "rebuild the heap" (Scheduler.__init__); the stubs omit it.
            self._heap = None  # type: ignore[assignment]
        if self._role != "active":
            self._role_since = time.time()
        self._role = "active"

    def _become_standby(self) -> None:
        if self._role != "standby":
            logger.warning(
                "Another beat holds the beat lock %r: this beat is on standby and sends "
                "nothing (it takes over if the other one stops).",
                LOCK_NAME,
            )
            self._role_since = time.time()
        self._role = "standby"


def _sync_sql() -> str:
    """UPDATE of one schedule's last run time and count (names from the model's metadata)."""
    from django_celery_beat.models import PeriodicTask

    meta, quote = PeriodicTask._meta, connection.ops.quote_name
    table, pk = quote(meta.db_table), quote(meta.pk.column)
    last, count = (quote(meta.get_field(f).column) for f in ("last_run_at", "total_run_count"))
    return f"UPDATE {table} SET {last} = %s, {count} = %s WHERE {pk} = %s"  # noqa: S608


class SentAhead(NamedTuple):
    task_id: str
    due: datetime.datetime
    changed_at: datetime.datetime | None  # the schedule's date_changed when sent
    schedule: object  # its Celery schedule (interval or crontab) when sent


def _next_runs(entry) -> tuple[datetime.datetime, datetime.datetime, datetime.datetime]:
    """Now, the entry's next due time and the due time after that, exactly.

    The schedule reads the clock itself; it is frozen here so that now + remaining
    is the due time to the microsecond (a crontab's due time a microsecond early
    would make the following one the same minute).
    """
    schedule = entry.schedule
    now = schedule.now()
    last_run_at = maybe_make_aware(entry.last_run_at).astimezone(entry.app.timezone)
    nowfun = schedule.nowfun
    try:
        schedule.nowfun = lambda: now
        due = now + schedule.remaining_estimate(last_run_at)
        schedule.nowfun = lambda: due
        following = due + schedule.remaining_estimate(due)
    finally:
        schedule.nowfun = nowfun
    return now, due, following
