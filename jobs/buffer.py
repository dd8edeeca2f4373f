"""Batched best-effort writes for the worker's hot path.

Recording RECEIVED (in the worker's main process, which is Celery's bottleneck) and
STARTED (in each pool process) with one UPDATE per run costs a large share of raw
Celery's throughput. These transitions are informative, not durable promises, so each
process collects them and writes them together every ``interval`` seconds from a
background thread. The final state of a run is never buffered: it is written before
the message is acknowledged (jobs.backends).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from django.db import DatabaseError, connection

logger = logging.getLogger(__name__)


class UpdateBuffer:
    def __init__(self, sql: str, interval: float = 0.1) -> None:
        self.sql = sql
        self.interval = interval
        self._rows: dict[str, tuple] = {}  # run id -> parameters (the id is last)
        self._lock = threading.Lock()
        self._pid: int | None = None

    def add(self, row: tuple) -> None:
        if self._pid != os.getpid():
            self._start()
        with self._lock:
            self._rows[row[-1]] = row

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

    def flush(self) -> int:
        with self._lock:
            rows, self._rows = list(self._rows.values()), {}
        if not rows:
            return 0
        # Autocommit: each UPDATE holds its row lock only for itself, never for the
        # whole batch, so a pool process writing a final state does not wait on it.
        with connection.cursor() as cursor:
            cursor.executemany(self.sql, rows)
        return len(rows)


# Only rows still waiting: a run that already moved on has (or will get) its received
# time from its final write, and an UPDATE that matches nothing writes nothing — no new
# row version, no index entries, no row lock held against the pool process.
received = UpdateBuffer(
    "UPDATE jobs_job SET received_at = %s, worker = %s, state = 'RECEIVED' "
    "WHERE id = %s AND state = 'PENDING'"
)
started = UpdateBuffer(
    "UPDATE jobs_job SET started_at = %s, worker = %s, "
    "state = CASE WHEN state IN ('PENDING', 'RECEIVED', 'RETRY', 'LOST') "
    "THEN 'STARTED' ELSE state END "
    "WHERE id = %s AND state NOT IN ('SUCCESS', 'FAILURE', 'REVOKED')"
)


def flush_all() -> None:
    for buffer in (received, started):
        try:
            buffer.flush()
        except DatabaseError as exc:
            logger.warning("Buffered state writes lost at shutdown: %s", exc)
