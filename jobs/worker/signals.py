"""Signal handlers, connected in JobsConfig.ready(); each hands over to a module."""

import logging
import select
import threading
import time

from celery import current_app
from django.conf import settings
from django.db import close_old_connections, connection

from jobs import heartbeat
from jobs.services import queues_paused, redis_queues_migrate
from jobs.worker import buffer, commit, guard, logs, quorum, tracking

logger = logging.getLogger(__name__)

# A PostgreSQL connection the previous run used this recently is not pinged (SELECT 1)
# before the next one — back to back, that is one database round trip per run more.
# Its socket is looked at instead, which costs no round trip: a server that ended the
# connection (restart, pg_terminate_backend) has left it readable.
HEALTH_CHECK_AFTER_IDLE = 1.0  # seconds
_last_run_end = [float("-inf")]


def on_task_received(sender=None, request=None, **kwargs) -> None:
    tracking.record_received(request)


def on_task_prerun(sender=None, task_id=None, task=None, kwargs=None, **extra) -> None:
    # The connection is kept across tasks (CELERY_DB_REUSE_MAX): drop it if it broke
    # or is older than CONN_MAX_AGE, as Django does around each web request.
    close_old_connections()
    recent = time.monotonic() - _last_run_end[0] < HEALTH_CHECK_AFTER_IDLE
    if recent and connection.vendor == "postgresql" and connection.connection is not None:
        if _closed_by_server(connection.connection):
            connection.close()  # the run's first query connects afresh
        else:
            # Django's own flag (BaseDatabaseWrapper.__init__); django-stubs omit it.
            connection.health_check_done = True  # type: ignore[attr-defined]
    secrets = logs.secret_values(task.name, kwargs) if task is not None else []
    logs.log_capture.start(task_id, secrets)


def _closed_by_server(raw) -> bool:
    """Whether the server has sent something on an idle connection: its goodbye, or EOF."""
    try:
        readable, _, _ = select.select([raw.fileno()], [], [], 0)
    except (OSError, ValueError, AttributeError):  # closed already, or no socket
        return True
    return bool(readable)


def on_task_postrun(sender=None, task_id=None, **kwargs) -> None:
    logs.log_capture.stop(task_id)
    _last_run_end[0] = time.monotonic()


def on_worker_process_init(**kwargs) -> None:
    logs.install_log_capture()
    commit.wrap_tracers()


def on_worker_init(**kwargs) -> None:
    """The worker's main process, before its pool starts."""
    try:
        # Known before any of its processes can hold a run (jobs.heartbeat).
        heartbeat.incarnation_seen_now(guard.INSTANCE)
    except Exception:  # Redis away: the heartbeat writes it once Redis is back
        logger.exception("Could not record this worker's incarnation")
    try:
        indexed = guard.index_legacy_markers()
    except Exception:  # Redis away: the next worker start tries again
        logger.exception("Could not index the cancel markers set before the index")
    else:
        if indexed:
            logger.info("Indexed %d cancelled runs from before the index", indexed)
    try:
        # Before the consumer binds its queues: old bindings would break its lookups.
        moved = redis_queues_migrate()
    except Exception:  # broker away: the consumer's own retries report it
        logger.exception("Could not move Redis queues from the old key layout")
    else:
        if moved.messages or moved.bindings:
            logger.info(
                "Moved %d message(s) and %d binding(s) from the old Redis key layout",
                moved.messages, moved.bindings,
            )  # fmt: skip
    if settings.JOBSITE_QUEUE_TYPE == "quorum":
        try:
            # Before the consumer starts: its delayed-delivery step binds them all.
            quorum.queues_declare(current_app)
        except Exception:  # broker away: the next worker start declares them
            logger.exception("Could not declare the quorum queues")
    on_worker_process_init()  # the solo and threads pools run tasks in this process


_heartbeat_stop: threading.Event | None = None


def on_worker_ready(sender=None, **kwargs) -> None:
    """Start the worker's heartbeat; a queue paused before it started stays paused."""
    global _heartbeat_stop
    _heartbeat_stop = heartbeat.start_worker_heartbeat(sender.hostname, guard.INSTANCE)
    for queue in queues_paused():
        sender.cancel_task_queue(queue)


def on_worker_shutdown(**kwargs) -> None:
    """Write what the state buffers still hold before the process exits."""
    buffer.flush_all()


def on_worker_stopped(sender=None, **kwargs) -> None:
    """The worker's main process, stopping: flush, then leave the names pages wait for."""
    on_worker_shutdown()
    if _heartbeat_stop is not None:
        _heartbeat_stop.set()
    try:
        heartbeat.worker_gone(sender.hostname)
    except Exception as exc:  # Redis down: the name ages out of the heard ones instead
        logger.warning("Worker heartbeat not removed: %s", exc)
