"""The Celery application: configured from Django settings (CELERY_* names)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")

app = Celery("jobsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_configure.connect
def _sign_messages(sender, **kwargs) -> None:
    """With JOBSITE_SIGNING_* set, sign every message and accept only signed ones."""
    from django.conf import settings

    if settings.JOBSITE_SIGNING:
        # Results are stored as JSON, so JSON stays enabled (for them, not for tasks).
        allowed = ["json", "msgpack"] if settings.JOBSITE_SERIALIZER == "msgpack" else ["json"]
        sender.setup_security(allowed_serializers=allowed, serializer=settings.JOBSITE_SERIALIZER)
