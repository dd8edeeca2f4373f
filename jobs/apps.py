from django.apps import AppConfig
from django.db.models.signals import post_migrate

# The defaults of the JOBSITE_* settings, before any module of the app reads them.
from jobs import conf  # noqa: F401


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here: apps.py is loaded before the app registry is ready.
        from django.conf import settings
        from django.utils.module_loading import autodiscover_modules

        from jobs import (
            checks,  # noqa: F401  (registers the system checks)
            tasks,  # noqa: F401  (Jobsite's own job types and tasks)
        )

        # Every installed app's job types, as Celery's autodiscover_tasks finds tasks.
        autodiscover_modules(*getattr(settings, "JOBSITE_CATALOG_MODULES", ["tasks"]))
        post_migrate.connect(_sync_catalog, sender=self)


def _sync_catalog(sender, **kwargs) -> None:
    """After migrate: a JobType row per declared job type, and the roles' permissions."""
    # Imported here, as in ready(): apps.py is loaded before the models are.
    from jobs import roles, services

    services.jobtypes_sync()
    roles.setup_roles()
