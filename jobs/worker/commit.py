"""Group commit: the worker's main process stores final states in batches.

Storing each run's final state from its pool process costs that process a database
round trip and a commit per run, during which it runs nothing (on RabbitMQ that was
half of raw Celery's throughput). Instead, a successful run that Jobsite submitted
returns to the main process as it does anyway (Celery sends the return value there),
and the main process stores the final states of all runs that finished meanwhile in
one statement (jobs.worker.backend.BATCH_FINAL_SQL), from a thread of its own: a batch's
first run waits up to JOBSITE_GROUP_COMMIT_WAIT_MS for others, and while one batch is
written, the next one gathers. Only after that statement returns (autocommit: durable)
are the messages of ``acks_late`` runs acknowledged, so a worker that dies first leaves
them on the broker, to be delivered again. On Redis, a batch's acks go out in one
pipeline (redis_acks_pipelined).

What stays on the pool process's own, immediate write: failures, retries, revocations,
runs with the duplicate guard (its Redis marker says "done" when the run returns),
runs in a chord, chain or group or with callbacks (what follows must see the result),
runs Jobsite did not submit (their row is created then), and successful runs that made
a result file, child tasks or custom meta (jobs.worker.backend._deferred).

On by default with PostgreSQL and the prefork pool; JOBSITE_GROUP_COMMIT=0 turns it off.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import threading
import time
from datetime import UTC, datetime
from typing import cast

from celery import current_app as app
from celery.app.task import Context
from celery.worker.request import Request
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection
from kombu.transport.redis import QoS as RedisQoS

from jobs.worker import backend, tracking
from jobs.worker.task import JobTask

logger = logging.getLogger(__name__)

MAX_BATCH = 500  # runs per statement
RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)  # then every 2 s, until it is stored

_committer: GroupCommit | None = None


class JobRequest(Request):
    """Celery's request in the worker's main process, for catalogued tasks.

    A request that may be group-committed is marked ``jobsite_defer`` (the pool
    process reads it, and leaves the successful final state to the main process),
    and its acknowledgement after a success waits for that state to be stored.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        committer = _committer
        if committer is not None and committer.accepting and self._deferrable():
            # Request's own message dict and payload: internals its stubs do not list.
            self._request_dict["jobsite_defer"] = True  # type: ignore[attr-defined]
            # Celery builds a subclass per task type whose on_success is its own; an
            # instance attribute comes first, and hands over to it.
            self.on_success = self._on_success_deferring  # type: ignore[method-assign]

    def _deferrable(self) -> bool:
        task = self.task
        if getattr(task, "jobsite_guard", False):
            return False
        if self.type.startswith(tracking.MAINTENANCE_PREFIX):
            return False
        headers = self._request_dict  # type: ignore[attr-defined]
        if headers.get("jobsite_max_retries") is None:  # not submitted by Jobsite
            return False
        if headers.get("group") or headers.get("chord"):
            return False
        _, _, embed = self._payload  # type: ignore[attr-defined]
        steps = ("callbacks", "errbacks", "chain", "chord")
        return not any((embed or {}).get(key) for key in steps)

    def _on_success_deferring(self, failed__retval__runtime, **kwargs):
        failed, retval, runtime = failed__retval__runtime
        if not failed and isinstance(retval, DeferredResult):
            # The pool process left the final state to us (jobs.worker.backend._deferred).
            committer = _committer
            item = _item(self, retval.value, runtime)
            if committer is not None:
                committer.add(item)
                if self.task.acks_late:
                    # Celery's on_success acknowledges: the committer does, once stored.
                    self.jobsite_ack_deferred = True
            else:  # shutting down meanwhile: store it now, before the ack
                try:
                    store([item])
                except Exception:
                    logger.exception("Could not store the final state of run %s", self.id)
                    self.jobsite_ack_deferred = True  # not acknowledged: it comes back
        return type(self).on_success(self, failed__retval__runtime, **kwargs)

    def acknowledge(self) -> None:
        if self.__dict__.pop("jobsite_ack_deferred", False):
            return
        super().acknowledge()


class DeferredResult(str):
    """What a pool process returns to the main process for a run it did not store.

    Celery sends the main process only the text of a successful run's return value
    (for its log line); this is that text, carrying the value itself as well.
    """

    value = None


def wrap_tracers() -> None:
    """In each pool process (worker_process_init): return DeferredResults."""
    from celery.app.trace import trace_ok_t

    def wrap(trace):
        def traced(uuid, args, kwargs, request=None, **options):
            retval, info, runtime, text = trace(uuid, args, kwargs, request, **options)
            if uuid in backend.DEFERRED:
                backend.DEFERRED.discard(uuid)
                if info is None:  # succeeded
                    text = DeferredResult(text)
                    text.value = retval
            return trace_ok_t(retval, info, runtime, text)

        return traced

    for task in app.tasks.values():
        if isinstance(task, JobTask) and getattr(task, "__trace__", None) is not None:
            task.__trace__ = wrap(task.__trace__)


def _item(request, value, runtime) -> tuple:
    """(request, result, started, finished, acks_late): one run for the committer."""
    started = request.time_start  # wall clock, from the pool process's start
    if started and runtime:
        finished = started + runtime
    else:
        finished = time.time()
        started = started or finished - (runtime or 0)
    return (request, value, started, finished, request.task.acks_late)


class GroupCommit:
    """Collects successful runs and stores them in batches from a thread of its own."""

    def __init__(self, consumer) -> None:
        self.accepting = True
        self.acking = False  # acknowledging a stored batch (in the event loop)
        self._waiting = 0  # acks_late runs waiting for their final state to be stored
        self._extra = 0  # by how much the prefetch window is widened for them
        self._static = settings.JOBSITE_QUEUE_TYPE == "quorum"  # per-consumer QoS
        self._peak = 0
        self._generation = 0
        self.on_consume(consumer)
        self._pending: list[tuple] = []
        self._first_at = 0.0  # when the oldest pending run arrived (time.monotonic)
        self._last_at = float("-inf")  # when the newest run arrived
        self._lone = False  # no run arrived in the gather window before the pending batch's first
        self._gather = settings.JOBSITE_GROUP_COMMIT_WAIT_MS / 1000  # seconds
        self._stored: collections.deque = collections.deque()  # requests to acknowledge
        self._wake = threading.Condition()
        self._closing = False
        self._writing = False
        self._failing = False  # the last write failed: the database is unreachable
        self._thread = threading.Thread(target=self._run, name="jobsite-commit", daemon=True)
        self._thread.start()

    # -- in the main process's event loop --------------------------------------

    def add(self, item: tuple) -> None:
        if item[-1]:
            self._waiting += 1
            self._widen()
        with self._wake:
            self._pending.append(item)
            # Wake the committer for the first run of a batch (it then gathers for
            # self._gather seconds) and for a full one; waking it for each run in between
            # would only make it contend with this thread for the GIL.
            now = time.monotonic()
            if len(self._pending) == 1:
                # A run that finishes alone (no other one in the gather window before
                # it) is stored at once: idle, waiting for company only adds the wait.
                self._lone = now - self._last_at >= self._gather
                self._first_at = now
                self._wake.notify_all()
            elif len(self._pending) == MAX_BATCH:
                self._wake.notify_all()
            self._last_at = now

    def acknowledge_stored(self) -> None:
        by_channel: dict[int, list] = {}
        while self._stored:
            request = self._stored.popleft()
            by_channel.setdefault(id(request.message.channel), []).append(request)
        self.acking = True  # the consumer acks inline (call_soon_ack), into the pipeline
        try:
            for group in by_channel.values():
                with redis_acks_pipelined(group[0].message.channel):
                    for request in group:
                        Request.acknowledge(request)
                        self._waiting -= 1
        finally:
            self.acking = False

    # Runs waiting for their ack still count against the prefetch window, so the pool
    # would wait for messages while a batch is written. The window is widened by about
    # twice the runs waiting (as Celery widens it for runs held for their ETA), and
    # narrowed back once a second: each change is a round trip to RabbitMQ (basic.qos),
    # so it is not done per run, and a worker that moves on to long jobs soon holds
    # no more messages than its prefetch setting says.
    # Not with quorum queues: their QoS is per consumer, and RabbitMQ applies a
    # basic.qos only to consumers started after it, so widening would be round trips
    # that change nothing (Celery says so: "Prefetch count is now static"). The acks
    # still wait for the batch (that is what makes a stored run's message safe to drop);
    # a worker that should not stall on them gets a larger
    # CELERY_WORKER_PREFETCH_MULTIPLIER instead.

    def _widen(self) -> None:
        self._peak = max(self._peak, self._waiting)
        if self._static:
            return
        if self._failing:
            return  # the database is away: let the unacknowledged runs hold consumption
        if self._waiting > self._extra:
            self._set_extra(min(_round_up(2 * self._waiting), 2 * MAX_BATCH))

    def _narrow(self, generation: int) -> None:
        if generation != self._generation:
            return  # a reconnect started a new round
        wanted = _round_up(self._peak) if self._peak and not self._failing else 0
        self._peak = self._waiting
        if wanted < self._extra:
            self._set_extra(wanted)
        self.consumer.hub.call_later(1.0, self._narrow, generation)

    def _set_extra(self, extra: int) -> None:
        qos = self.consumer.qos
        if extra > self._extra:
            qos.increment_eventually(extra - self._extra)
        elif extra < self._extra:
            qos.decrement_eventually(self._extra - extra)
        self._extra = extra

    def on_consume(self, consumer) -> None:
        """A (re)connected consumer: its prefetch window starts from its setting."""
        self.consumer = consumer
        self._extra = 0
        self._peak = self._waiting
        self._generation += 1
        consumer.hub.call_later(1.0, self._narrow, self._generation)

    def drain(self, timeout: float = 10.0) -> None:
        """Store what is pending and acknowledge it now (main thread; the worker stops).

        Celery closes the consumer's channel right after, and a message not
        acknowledged by then goes back to the queue, to be run again.
        """
        deadline = time.monotonic() + timeout
        with self._wake:
            while (self._pending or self._writing) and time.monotonic() < deadline:
                self._wake.wait(0.05)
        self.acknowledge_stored()

    def close(self, timeout: float = 30.0) -> None:
        """At worker shutdown: store what is pending, then acknowledge it (main thread)."""
        self.accepting = False
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("Final states still unstored at shutdown: their runs will be redelivered")
            return
        self.acknowledge_stored()

    # -- in the committer's thread ----------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                # Gather: a statement costs about as much for one run as for twenty (a
                # round trip, a plan, a commit), so the batch's first run waits for
                # company (JOBSITE_GROUP_COMMIT_WAIT_MS) counted from its arrival.
                # A lone run (none arrived in the window before it) goes at once; under
                # load runs follow each other closely and batches gather.
                deadline = self._first_at + (0.0 if self._lone else self._gather)
                while len(self._pending) < MAX_BATCH and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._writing = True
            if not self._store(batch):
                return  # closing, and the database is unreachable: not acknowledged
            with self._wake:
                self._stored.extend(item[0] for item in batch if item[-1])
                self._writing = False
                self._wake.notify_all()
            hub = self.consumer.hub
            if hub is not None and not self._closing:
                hub.call_soon(self.acknowledge_stored)

    def _store(self, batch: list[tuple]) -> bool:
        """Store the batch; retry a lost database until it is back (False: gave up)."""
        attempt = 0
        while True:
            try:
                store(batch)
            except (OperationalError, InterfaceError) as exc:
                self._failing = True
                with contextlib.suppress(Exception):
                    connection.close()
                if self._closing and attempt >= len(RETRY_DELAYS):
                    logger.error("Database unreachable at shutdown (%s)", exc)
                    return False
                if attempt == 0:
                    logger.warning(
                        "Storing %d final states failed (%s); retrying until the database is back",
                        len(batch),
                        exc,
                    )
                time.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
                attempt += 1
            except DatabaseError as exc:
                # A value the database refuses (e.g. a NUL character in a result):
                # store the runs one by one, so that one bad run fails alone.
                if len(batch) == 1:
                    _store_refused(batch[0], exc)
                    return True
                logger.warning("A batch of final states was refused (%s); storing one by one", exc)
                return all(self._store([item]) for item in batch)
            else:
                if self._failing:
                    logger.warning("Final states are stored again")
                self._failing = False
                return True


def store(batch: list[tuple]) -> None:
    """One statement for the batch's runs, in autocommit: durable when it returns."""
    result_backend = cast(backend.JobResultBackend, app.backend)  # CELERY_RESULT_BACKEND
    rows: dict[str, dict] = {}
    for request, retval, started, finished, _ in batch:
        context = Context(request.request_dict)  # with args, kwargs, hostname
        received = request.request_dict.get("jobsite_received_at")
        # A duplicate delivery: stored once.
        rows[request.id] = result_backend.success_row(context, retval, started, received, finished)
    ordered = [rows[run_id] for run_id in sorted(rows)]  # row locks in a stable order
    with connection.cursor() as cursor:
        cursor.execute(backend.BATCH_FINAL_SQL, [datetime.now(UTC), json.dumps(ordered)])


def _store_refused(item: tuple, exc: Exception) -> None:
    """The database refused the run's result: record the run failed, with the reason."""
    from celery import states

    request = item[0]
    logger.error("Could not store the result of run %s: %s", request.id, exc)
    result = {"exc_type": type(exc).__name__, "exc_message": f"Result could not be stored: {exc}"}
    context = Context(request.request_dict)
    with contextlib.suppress(Exception):
        app.backend.store_result(request.id, result, states.FAILURE, request=context)


class _Queued:
    """What kombu's Redis QoS.ack executes while acks are pipelined: nothing yet."""

    def execute(self) -> None:
        return None


@contextlib.contextmanager
def redis_acks_pipelined(channel):
    """Send the Redis acknowledgements made inside in one pipeline, on leaving.

    kombu's Redis transport emulates an ack by removing the delivery tag from its
    unacked index, a MULTI/EXEC round trip of its own (QoS.ack); in the worker's main
    process, Celery's bottleneck, those round trips took a fifth of the time per run.
    A batch of stored runs is acknowledged with one. Other transports ack as usual (an
    AMQP basic.ack is one frame written, no round trip).

    If the pipeline fails (Redis away), the runs stay in the unacked index and come
    back after the visibility timeout, as when an ack is lost with a single run.
    """
    qos = getattr(channel, "_qos", None)
    if not isinstance(qos, RedisQoS) or channel.closed or channel.connection is None:
        yield  # not Redis, or a channel a reconnect closed: each ack finds its own way
        return
    with qos.pipe_or_acquire() as pipe:
        # kombu's Redis QoS internal (not in its stubs), patched on purpose for the batch.
        add = qos._remove_from_indices  # type: ignore[attr-defined]
        qos._remove_from_indices = lambda tag, _pipe=None: (add(tag, pipe), _Queued())[1]  # type: ignore[attr-defined]
        try:
            yield
        finally:
            del qos._remove_from_indices  # type: ignore[attr-defined]  # back to the class's own
            try:
                pipe.execute()
            except Exception as exc:
                logger.warning(
                    "Acknowledgements lost (%s): those runs are redelivered after the "
                    "visibility timeout",
                    exc,
                )


def _round_up(n: int, step: int = 8) -> int:
    return -(-n // step) * step


def install(consumer) -> GroupCommit | None:
    """Called by the worker's consumer when it starts consuming (each reconnect too)."""
    global _committer
    if _committer is not None:
        _committer.on_consume(consumer)
        return _committer
    if not enabled(consumer):
        return None
    _committer = GroupCommit(consumer)
    logger.info("Final states are group-committed by the main process")
    return _committer


def enabled(consumer) -> bool:
    from celery.concurrency.prefork import TaskPool

    return (
        settings.JOBSITE_GROUP_COMMIT
        and connection.vendor == "postgresql"
        and consumer.hub is not None
        and isinstance(consumer.pool, TaskPool)
    )


def acking() -> bool:
    """Whether the event loop is acknowledging a stored batch right now."""
    return _committer is not None and _committer.acking


def drain() -> None:
    if _committer is not None:
        _committer.drain()


def shutdown() -> None:
    global _committer
    committer, _committer = _committer, None
    if committer is not None:
        committer.close()
