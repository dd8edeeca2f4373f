"""Jobsite's settings, with their documented defaults (django-appconf, prefix JOBSITE_).

A host project sets only what it changes; everything read as ``settings.JOBSITE_<NAME>``
has the default below when the project does not set it. The ready-made site
(jobsite/settings.py) reads each from the environment instead. docs/install.md lists
them with their meaning.
"""

from __future__ import annotations

from appconf import AppConf
from django.conf import settings  # noqa: F401  (AppConf fills in its defaults)


class JobsiteConf(AppConf):
    # Jobsite's own Redis (markers, heartbeats, beat's lock, alert marks): not the broker.
    REDIS_URL = "redis://127.0.0.1:6379/1"
    PAGE_SIZE = 50
    MAX_PARAMS_BYTES = 64 * 1024
    MAX_MESSAGE_BYTES = 1024 * 1024
    GROUP_COMMIT = True
    GROUP_COMMIT_WAIT_MS = 20
    BEAT_LOCK_TTL = 30
    BEAT_LEAD = 10
    METRICS_TOKEN = ""
    METRICS_ALLOW: list[str] = []
    BASE_URL = "http://127.0.0.1:8000"
    ALERT_SCHEDULE_GRACE = 120
    ALERT_HEARTBEAT_GRACE = 180
    ALERT_WEBHOOK_TIMEOUT = 5
    ALERT_WEBHOOK_ATTEMPTS = 3
    ALERT_WEBHOOK_BACKOFF = 0.5
    ALERTS_CHECK_EVERY = 60
    # Alert webhooks reach non-global addresses only for these hosts or networks.
    WEBHOOK_ALLOWED_HOSTS: list[str] = []
    # Submits per user ("<number>/<s|min|hour|day>"); how far ahead a run may start.
    SUBMIT_RATE = "60/min"
    MAX_ETA_DAYS = 30
    RELAY_EVERY = 15
    LOST_AFTER = 300
    # A Redis-broker run sent this long ago that no worker has received is sent again.
    REDIS_RESEND_AFTER = 120
    # RabbitMQ queue type of Jobsite's queues: "classic" or "quorum" (README, *Quorum
    # queues*); the worker's prefetch and delays follow it.
    QUEUE_TYPE = "classic"
    RETENTION_DAYS = 30
    # The event recorder (manage.py record_events): events per stored batch, the longest
    # an event waits in a batch (ms), and, on RabbitMQ, how many events its durable queue
    # keeps while it is down (then the oldest go) and for how long (s).
    EVENTS_BATCH = 500
    EVENTS_FLUSH_MS = 200
    EVENTS_BACKLOG = 1_000_000
    EVENTS_TTL = 24 * 3600
    SERIALIZER = "json"
    COMPRESSION = ""
    SIGNING = False
    # Modules, in every installed app, that declare job types (imported at startup, as
    # Celery's autodiscover_tasks imports ``tasks``).
    CATALOG_MODULES = ["tasks"]
    # Jobsite's demo job types, workflows and benchmark tasks (jobs/tasks/): the
    # ready-made site shows them; a project that adds the app starts without them.
    DEMO_JOB_TYPES = False

    class Meta:
        prefix = "jobsite"
