"""Signal handlers, connected in JobsConfig.ready(); each hands over to a module."""

from jobs import catalog, tracking


def sync_catalog(sender, **kwargs) -> None:
    from jobs.roles import setup_roles

    catalog.sync()
    setup_roles()


def on_task_received(sender=None, request=None, **kwargs) -> None:
    tracking.record_received(request)


def on_task_prerun(sender=None, task_id=None, **kwargs) -> None:
    tracking.log_capture.start(task_id)


def on_task_postrun(sender=None, task_id=None, **kwargs) -> None:
    tracking.log_capture.stop(task_id)


def on_worker_process_init(**kwargs) -> None:
    tracking.install_log_capture()
