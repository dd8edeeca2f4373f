"""Batched best-effort writes for the worker's hot path.

Recording RECEIVED (in the worker's main process, which is Celery's bottleneck) and
STARTED (in each pool process) with one UPDATE per run costs a large share of raw
Celery's throughput. These transitions are informative, not durable promises, so each
process collects them and writes them together every ``interval`` seconds from a
background thread. The final state of a run is never buffered: it is written before
the message is acknowledged (jobs.worker.backend).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from django.db import DatabaseError, connection

logger = logging.getLogger(__name__)


class UpdateBuffer:
    """Rows of one UPDATE, written every ``interval`` once they are ``min_age`` old.

    A row discarded before it is written (its run moved on) costs the database nothing.
    """

    def __init__(
        self, sql: str, interval: float = 0.1, min_age: float = 0.0, *, background: bool = True
    ) -> None:
        self.sql = sql
        self.interval = interval
        self.min_age = min_age
        self.background = background  # a thread of its own flushes (off: call flush())
        self._rows: dict[str, tuple] = {}  # run id -> (added at, parameters; the id last)
        self._lock = threading.Lock()
        self._pid: int | None = None

    def add(self, row: tuple) -> None:
        if self._pid != os.getpid():
            self._start()
        with self._lock:
            self._rows[row[-1]] = (time.monotonic(), row)

    def discard(self, run_id: str) -> None:
        """The run's final state is being written: its pending write is moot."""
        with self._lock:
            self._rows.pop(run_id, None)

    def _start(self) -> None:
        # First use in this process (the pool forks after import): a fresh lock and a
        # thread of our own; rows inherited from the parent are the parent's to write.
        self._lock = threading.Lock()
        self._rows = {}
        self._pid = os.getpid()
        if self.background:
            threading.Thread(target=self._run, name="jobsite-buffer", daemon=True).start()

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.interval):
            try:
                self.flush()
            except Exception as exc:  # keep going whatever broke: these writes are best-effort
                logger.warning("Buffered state writes failed: %s", exc)
                # A broken connection (database restarted, connection killed) can fail
                # to close too; the next flush opens a new one either way.
                with contextlib.suppress(Exception):
                    connection.close()

    def flush(self, *, everything: bool = False) -> int:
        with self._lock:
            if everything or not self.min_age:
                rows = [row for _, row in self._rows.values()]
                self._rows = {}
            else:
                born = time.monotonic() - self.min_age
                rows = [row for added, row in self._rows.values() if added <= born]
                for row in rows:
                    del self._rows[row[-1]]
        if not rows:
            return 0
        # Autocommit: each UPDATE holds its row lock only for itself, never for the
        # whole batch, so a pool process writing a final state does not wait on it.
        with connection.cursor() as cursor:
            cursor.executemany(self.sql, rows)
        return len(rows)


# Only rows still waiting: a run that already moved on has (or will get) its received
# time from its final write, and an UPDATE that matches nothing writes nothing — no new
# row version, no index entries, no row lock held against the pool process. RECEIVED is
# written for runs that wait in the worker (an ETA, a busy pool) for a second or more;
# the others start at once, and their write is discarded when they are acknowledged.
received = UpdateBuffer(
    "UPDATE jobs_job SET received_at = %s, worker = %s, state = 'RECEIVED' "
    "WHERE id = %s AND state = 'PENDING'",
    interval=0.25,
    min_age=1.0,
)
# Guarded runs are not in it: their STARTED is written when their marker is claimed
# (jobs.worker.tracking.record_claimed_start); each write here is one execution more.
started = UpdateBuffer(
    "UPDATE jobs_job SET started_at = %s, worker = %s, executions = executions + 1, "
    "state = CASE WHEN state IN ('PENDING', 'RECEIVED', 'RETRY', 'LOST') "
    "THEN 'STARTED' ELSE state END "
    "WHERE id = %s AND state NOT IN ('SUCCESS', 'FAILURE', 'REVOKED')"
)


def flush_all() -> None:
    for buffer in (received, started):
        try:
            buffer.flush(everything=True)
        except DatabaseError as exc:
            logger.warning("Buffered state writes lost at shutdown: %s", exc)
