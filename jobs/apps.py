from django.apps import AppConfig
from django.db.models.signals import post_migrate


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery import signals

        from jobs import signals as handlers
        from jobs import tasks  # noqa: F401  (declares the catalogue)

        post_migrate.connect(handlers.sync_catalog, sender=self)
        signals.task_received.connect(handlers.on_task_received, weak=False)
        signals.task_prerun.connect(handlers.on_task_prerun, weak=False)
        signals.task_postrun.connect(handlers.on_task_postrun, weak=False)
        signals.worker_process_init.connect(handlers.on_worker_process_init, weak=False)
        signals.worker_init.connect(handlers.on_worker_init, weak=False)
        signals.worker_ready.connect(handlers.on_worker_ready, weak=False)
        signals.worker_process_shutdown.connect(handlers.on_worker_shutdown, weak=False)
        signals.worker_shutdown.connect(handlers.on_worker_shutdown, weak=False)
