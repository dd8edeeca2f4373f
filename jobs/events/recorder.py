"""The recorder: consume Celery's task and worker events, store them in batches.

How events are kept while the recorder is down (README, *Runs of other workers*):

- **RabbitMQ**: the recorder consumes a durable queue of its own,
  ``jobsite.events.recorder``, bound to Celery's event exchange (``celeryev``, every
  routing key). It outlives the recorder, so the events sent while it is stopped or
  restarting wait there, up to ``JOBSITE_EVENTS_BACKLOG`` events (then the oldest are
  dropped) and for ``JOBSITE_EVENTS_TTL`` seconds each. Events are acknowledged only
  after the batch holding them is committed: a recorder killed mid-batch gets them
  again (stored twice: the merge is idempotent). Several recorders share the queue.
- **Redis**: kombu sends events by PUBLISH, to whoever is subscribed at that moment.
  Nothing keeps them for a recorder that is not running: the events of that gap are
  lost, and a run whose every event fell in it is not in the history (a run with at
  least one event after the gap is, without what the lost events said).

Celery's own EventReceiver (what Flower and ``celery events`` use) consumes without
acknowledgements from an auto-deleted queue; the subclass below changes only that, in
the one place docs/internals.md lists (entry 76).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

from celery.events.receiver import EventReceiver
from django.conf import settings
from django.db import close_old_connections
from kombu import Queue

from jobs import heartbeat, routing
from jobs.services.events import (
    events_mark_silent_workers_lost,
    events_store,
    is_jobsite_worker,
)

logger = logging.getLogger(__name__)

QUEUE_NAME = "jobsite.events.recorder"
SILENT_CHECK_EVERY = 30.0  # seconds between looks for foreign workers gone silent
WORKERS_SHARE_EVERY = 5.0  # seconds between writes of who was heard (the workers page)


class DurableEventReceiver(EventReceiver):
    """Celery's receiver on a durable, bounded queue, acknowledging after storing.

    On Redis it is Celery's receiver as it is (no acknowledgements: events are
    published, not queued).
    """

    def __init__(self, connection, *, handler: Callable, durable: bool, app, **kwargs):
        super().__init__(
            connection,
            handlers={"*": handler},
            app=app,
            node_id="recorder",
            queue_prefix="jobsite.events",
            **kwargs,
        )
        self.durable = durable
        self.on_message = handler
        if durable:
            self.queue = Queue(
                QUEUE_NAME,
                exchange=self.exchange,  # type: ignore[attr-defined]
                routing_key=self.routing_key,  # type: ignore[attr-defined]
                durable=True,
                auto_delete=False,
                message_ttl=float(settings.JOBSITE_EVENTS_TTL),
                max_length=int(settings.JOBSITE_EVENTS_BACKLOG),
                queue_arguments={"x-overflow": "drop-head"},
            )

    def get_consumers(self, Consumer, channel):
        if not self.durable:
            return super().get_consumers(Consumer, channel)
        return [
            Consumer(
                queues=[self.queue],
                callbacks=[self._receive_acked],
                no_ack=False,
                accept=self.accept,  # type: ignore[attr-defined]
                prefetch_count=2 * int(settings.JOBSITE_EVENTS_BATCH),
            )
        ]

    def _receive_acked(self, body, message) -> None:
        # Celery's _receive, keeping the message to acknowledge once stored.
        if isinstance(body, list):  # celery 4.0+: a list of events
            for item in body:
                self.on_message(self.event_from_message(item)[1], message)
        else:
            self.on_message(self.event_from_message(body)[1], message)


class Recorder:
    """Batches events and stores each batch in one statement (jobs.services.events)."""

    def __init__(self, app, *, batch: int | None = None, flush_ms: int | None = None) -> None:
        self.app = app
        self.batch = batch or int(settings.JOBSITE_EVENTS_BATCH)
        self.flush_after = (flush_ms or int(settings.JOBSITE_EVENTS_FLUSH_MS)) / 1000
        self.pending: list[dict] = []
        self.last_message = None
        self.first_at = 0.0
        self.stored = 0
        self.workers: dict[str, float] = {}  # foreign worker -> its last event (epoch s)
        self.last_silent_check = time.monotonic()
        self.last_shared = 0.0
        self.receiver: DurableEventReceiver | None = None

    def on_event(self, event: dict, message=None) -> None:
        kind = event.get("type", "")
        hostname = event.get("hostname")
        if hostname and kind != "task-sent":
            self.workers[str(hostname)] = time.time()
            if kind == "worker-offline":
                self.workers.pop(str(hostname), None)
        if kind.startswith("task-"):
            if not self.pending:
                self.first_at = time.monotonic()
            self.pending.append(event)
        if message is not None:
            self.last_message = message
            if not kind.startswith("task-") and not self.pending:
                self._ack()
        if len(self.pending) >= self.batch:
            self.flush()

    def on_iteration(self) -> None:
        if self.pending and time.monotonic() - self.first_at >= self.flush_after:
            self.flush()
        if time.monotonic() - self.last_shared >= WORKERS_SHARE_EVERY:
            self.last_shared = time.monotonic()
            self._share_workers()
        if time.monotonic() - self.last_silent_check >= SILENT_CHECK_EVERY:
            self.last_silent_check = time.monotonic()
            self._store(lambda: events_mark_silent_workers_lost(self.workers))

    def _share_workers(self) -> None:
        """Tell the pages which workers that are not Jobsite's were heard (they answer
        remote-control calls too)."""
        now = time.time()
        recent = {n: at for n, at in self.workers.items() if now - at < heartbeat.INCARNATION_TTL}
        heard = {n: at for n, at in recent.items() if not is_jobsite_worker(n, now)}
        try:
            heartbeat.foreign_workers_seen(heard)
        except Exception as exc:  # Redis down: the pages ask Jobsite's workers only
            logger.warning("Could not record the workers heard: %s", exc)

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        self.stored += self._store(lambda: events_store(batch))
        self._ack()

    def _store(self, write: Callable[[], int]) -> int:
        """Write until it succeeds: while the database is down, events wait in the broker."""
        delay = 0.5
        while True:
            try:
                close_old_connections()
                return write()
            except Exception as exc:  # the database restarting, or gone for a while
                if self.receiver is not None and self.receiver.should_stop:
                    raise
                logger.warning("Could not store events (again in %.0f s): %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _ack(self) -> None:
        message, self.last_message = self.last_message, None
        if message is None or not getattr(self.receiver, "durable", False):
            return
        try:
            message.ack(multiple=True)  # every delivery up to this one
        except Exception as exc:  # its channel closed: the broker delivers them again
            logger.info("Events not acknowledged (%s): they come again", exc)

    def run(self) -> None:
        url = self.app.conf.broker_read_url or self.app.conf.broker_url
        durable = routing.is_rabbitmq(url)
        with self.app.connection_for_read() as connection:
            self.receiver = DurableEventReceiver(
                connection, handler=self.on_event, durable=durable, app=self.app
            )
            self.receiver.on_iteration = self.on_iteration  # type: ignore[method-assign]

            def stop(signum, frame):
                assert self.receiver is not None
                self.receiver.should_stop = True

            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
            logger.info(
                "Recording task events from %s (%s)",
                connection.as_uri(),
                "durable queue " + QUEUE_NAME if durable else "published, not kept",
            )
            print("Event recorder ready.", flush=True)
            try:
                self.receiver.run(safety_interval=min(self.flush_after, 1.0))
            finally:
                self.flush()
        logger.info("Event recorder stopped: %s runs stored", self.stored)
