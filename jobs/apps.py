from django.apps import AppConfig
from django.db.models.signals import post_migrate


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery import signals

        from jobs import tasks  # noqa: F401  (declares the catalogue)
        from jobs.worker import signals as handlers

        post_migrate.connect(_sync_catalog, sender=self)
        signals.task_received.connect(handlers.on_task_received, weak=False)
        signals.task_prerun.connect(handlers.on_task_prerun, weak=False)
        signals.task_postrun.connect(handlers.on_task_postrun, weak=False)
        signals.worker_process_init.connect(handlers.on_worker_process_init, weak=False)
        signals.worker_init.connect(handlers.on_worker_init, weak=False)
        signals.worker_ready.connect(handlers.on_worker_ready, weak=False)
        signals.worker_process_shutdown.connect(handlers.on_worker_shutdown, weak=False)
        signals.worker_shutdown.connect(handlers.on_worker_shutdown, weak=False)


def _sync_catalog(sender, **kwargs) -> None:
    """After migrate: a JobType row per declared job type, and the roles' permissions."""
    # Imported here, as in ready(): apps.py is loaded before the models are.
    from jobs import roles, services

    services.jobtypes_sync()
    roles.setup_roles()
