"""Signal handlers, connected in JobsConfig.ready(); each hands over to a module."""

from django.db import close_old_connections

from jobs import catalog, tracking


def sync_catalog(sender, **kwargs) -> None:
    from jobs.roles import setup_roles

    catalog.sync()
    setup_roles()


def on_task_received(sender=None, request=None, **kwargs) -> None:
    tracking.record_received(request)


def on_task_prerun(sender=None, task_id=None, task=None, kwargs=None, **extra) -> None:
    # The connection is kept across tasks (CELERY_DB_REUSE_MAX): drop it if it broke
    # or is older than CONN_MAX_AGE, as Django does around each web request.
    close_old_connections()
    secrets = tracking.secret_values(task.name, kwargs) if task is not None else []
    tracking.log_capture.start(task_id, secrets)


def on_task_postrun(sender=None, task_id=None, **kwargs) -> None:
    tracking.log_capture.stop(task_id)


def on_worker_process_init(**kwargs) -> None:
    tracking.install_log_capture()


def on_worker_ready(sender=None, **kwargs) -> None:
    """Start the worker's heartbeat; a queue paused before it started stays paused."""
    from jobs import heartbeat
    from jobs.services import queues_paused

    heartbeat.start_worker_heartbeat(sender.hostname)
    for queue in queues_paused():
        sender.cancel_task_queue(queue)


def on_worker_shutdown(**kwargs) -> None:
    """Write what the state buffers still hold before the process exits."""
    from jobs import buffer

    buffer.flush_all()
