"""Wiring Jobsite into a Celery app: one call in the project's Celery module.

    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    jobs.celery.install(app)
    app.autodiscover_tasks()

``install`` makes Jobsite's pieces the app's configuration where the project set
nothing itself (a ``CELERY_RESULT_BACKEND`` of its own wins), connects the worker's signal
handlers, and masks secrets in the settings Celery reports (`celery report`,
`celery inspect conf`). Each piece can be left out: ``install(app, beat_scheduler=None)``. What is
missing or mis-wired, ``manage.py check`` reports (jobs/checks.py).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping

from celery import Celery, signals
from celery.app import utils as celery_app_utils

from jobs import routing

RESULT_BACKEND = "jobs.worker.backend:JobResultBackend"
WORKER_CONSUMER = "jobs.worker.consumer:JobsiteConsumer"
BEAT_SCHEDULER = "jobs.beat:JobsiteScheduler"

# What tracking relies on: the STARTED state, the task's name and arguments in the
# result, JSON (never pickle).
REQUIRED = {
    "task_track_started": True,
    "result_extended": True,
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
}

# Celery signal -> handler in jobs.worker.signals.
SIGNALS = {
    "task_received": "on_task_received",
    "task_prerun": "on_task_prerun",
    "task_postrun": "on_task_postrun",
    "worker_process_init": "on_worker_process_init",
    "worker_init": "on_worker_init",
    "worker_ready": "on_worker_ready",
    "worker_process_shutdown": "on_worker_shutdown",
    "worker_shutdown": "on_worker_stopped",
}

_installed: weakref.WeakSet[Celery] = weakref.WeakSet()


def install(
    app: Celery,
    *,
    result_backend: str | None = RESULT_BACKEND,
    worker_consumer: str | None = WORKER_CONSUMER,
    beat_scheduler: str | None = BEAT_SCHEDULER,
    signals: bool = True,
) -> Celery:
    """Make Jobsite's result backend, consumer, beat scheduler and signals the app's."""
    defaults = dict(REQUIRED)
    for key, value in (
        ("result_backend", result_backend),
        ("worker_consumer", worker_consumer),
        ("beat_scheduler", beat_scheduler),
    ):
        if value:
            defaults[key] = value

    def apply(sender: Celery, source, **kwargs) -> None:
        # Once the app's configuration is read: a value the project set itself (in any
        # spelling, CELERY_RESULT_BACKEND included) stays. Not app.add_defaults(): its
        # defaults come before config_from_object's settings and would replace them.
        for key, value in {**defaults, **_routing_defaults(sender)}.items():
            if not source.value_set_for(key):
                source[key] = value

    if app.configured:  # type: ignore[attr-defined]  # set by Celery; not in the stubs
        apply(app, app.conf)
    else:
        app.on_after_configure.connect(apply, weak=False)
    app.on_after_configure.connect(_sign_messages, weak=False)
    if signals:
        connect_signals()
    mask_secrets_in_reports()
    _installed.add(app)
    return app


def _routing_defaults(app: Celery) -> dict:
    """Jobsite's queues (jobs/routing.py) for the app's broker, priorities 0-9."""
    return {
        "task_queues": routing.queues_for(app.conf.broker_url or ""),
        "task_default_queue": "default",
        "task_default_exchange": "default",
        "task_default_routing_key": "default",
        "task_default_priority": 5,
        "task_queue_max_priority": routing.MAX_PRIORITY,
    }


def installed(app: Celery) -> bool:
    return app in _installed


def connect_signals() -> None:
    """Connect the worker's handlers (once per process, whichever app calls it)."""
    for signal_name, handler_name in SIGNALS.items():
        getattr(signals, signal_name).connect(
            _Forward(handler_name), weak=False, dispatch_uid=f"jobsite.{handler_name}"
        )


def _sign_messages(sender: Celery, **kwargs) -> None:
    """With JOBSITE_SIGNING set, sign every message and accept only signed ones."""
    from django.conf import settings

    if getattr(settings, "JOBSITE_SIGNING", False):
        # Results are stored as JSON, so JSON stays enabled (for them, not for tasks).
        serializer = getattr(settings, "JOBSITE_SERIALIZER", "json")
        allowed = {"json", "msgpack"} if serializer == "msgpack" else {"json"}
        sender.setup_security(allowed_serializers=allowed, serializer=serializer)


class _Forward:
    """A signal receiver that calls ``jobs.worker.signals.<name>``.

    The Celery module is imported before Django is set up, and the handlers' module
    needs Django's models: it is imported when a signal first fires, by which time
    Celery's Django fix-up has set Django up.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.handler = None

    def __call__(self, *args, **kwargs):
        handler = self.handler
        if handler is None:
            from jobs.worker import signals as handlers  # see the class docstring

            handler = self.handler = getattr(handlers, self.name)
        return handler(*args, **kwargs)


# --- Secrets in `celery report`, `celery inspect conf` / `inspect report` (and Flower) ---
# All of them print the settings through Celery's filter_hidden_settings, which masks the
# values of names matching its pattern (KEY, TOKEN, SECRET, PASS, ...) and the URLs of the
# settings it knows by name (broker_url, *backend*). Read from Django's settings, every
# Django setting is listed and the broker's is CELERY_BROKER_URL, a name it does not know:
# CELERY_BROKER_URL and JOBSITE_REDIS_URL came out with their passwords. Celery has no
# hook for this, so its filter is wrapped (the one place all of those paths pass): the
# password of any URL among the values, and query parameters named like secrets, are
# masked too, whatever the setting is called (docs/internals.md, entry 45).
MASK = "*" * 8
_URL_PASSWORD = re.compile(r"(?P<user>[a-z][a-z0-9+.-]*://[^:/?#@\s]*):[^@/\s]*@", re.IGNORECASE)
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;][^=&;#\s]*(?:pass|token|key|secret|auth|signature)[^=&;#\s]*=)[^&;#\s]*",
    re.IGNORECASE,
)


def mask_url_secrets(value):
    """``value`` with every URL password and secret-looking query parameter masked."""
    if isinstance(value, str):
        masked = _URL_PASSWORD.sub(rf"\g<user>:{MASK}@", value)
        return _SECRET_QUERY.sub(rf"\g<name>{MASK}", masked)
    if isinstance(value, Mapping):
        return {key: mask_url_secrets(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(mask_url_secrets(item) for item in value)
    return value


def mask_secrets_in_reports() -> None:
    """Wrap Celery's settings filter with mask_url_secrets (once per process)."""
    celery_filter = celery_app_utils.filter_hidden_settings
    if getattr(celery_filter, "jobsite_masked", False):
        return

    def filter_hidden_settings(conf):
        return mask_url_secrets(celery_filter(conf))

    filter_hidden_settings.jobsite_masked = True  # type: ignore[attr-defined]
    filter_hidden_settings.__wrapped__ = celery_filter  # type: ignore[attr-defined]
    celery_app_utils.filter_hidden_settings = filter_hidden_settings
