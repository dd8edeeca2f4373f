"""Jobsite settings, read from the environment.

With no environment at all Jobsite runs as the *embedded default*: SQLite in var/,
a private Redis server on a unix socket in var/ (started by `python3 dev.py run`),
DEBUG on. A deployment sets DATABASE_URL and CELERY_BROKER_URL (and then must set
DJANGO_SECRET_KEY). See README.md for the full table.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from jobs import routing
from jobsite.env import (
    env_bool,
    env_broker,
    env_choice,
    env_database,
    env_int,
    env_list,
    env_redis,
    env_str,
    env_timezone,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("JOBSITE_VAR_DIR", str(BASE_DIR / "var")))
EMBEDDED_REDIS_SOCKET = VAR_DIR / "redis.sock"

# Embedded when nothing says where the database is: a laptop, not a deployment.
EMBEDDED = "DATABASE_URL" not in os.environ
if EMBEDDED:
    VAR_DIR.mkdir(parents=True, exist_ok=True)

# --- Core ---------------------------------------------------------------------
# https://docs.djangoproject.com/en/5.2/ref/settings/

DEBUG = env_bool("DJANGO_DEBUG", EMBEDDED)
if DEBUG:
    SECRET_KEY = env_str("DJANGO_SECRET_KEY", "insecure-dev-key-only-for-debug-mode")
else:
    SECRET_KEY = env_str("DJANGO_SECRET_KEY")
    if len(SECRET_KEY) < 50:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be at least 50 characters long.")

ALLOWED_HOSTS = env_list(
    "DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"] if DEBUG else []
)
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "django_celery_beat",
    "django_celery_results",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "jobs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Login everywhere: a page opts out explicitly with @login_not_required.
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "jobsite.urls"
WSGI_APPLICATION = "jobsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------
# https://docs.djangoproject.com/en/5.2/ref/databases/

DATABASES = {"default": env_database("DATABASE_URL", f"sqlite:///{VAR_DIR / 'jobsite.sqlite3'}")}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Web, worker and beat share one SQLite file: WAL lets readers and one writer
    # proceed together, and the timeout makes a writer wait instead of failing.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env_int("DJANGO_CONN_MAX_AGE", 60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth ---------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "jobs-dashboard"
LOGOUT_REDIRECT_URL = "login"

# --- Internationalisation -----------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_timezone("DJANGO_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

# --- Static and media files ---------------------------------------------------
# https://whitenoise.readthedocs.io/

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("JOBSITE_STATIC_ROOT", str(VAR_DIR / "static")))
STATICFILES_DIRS = [BASE_DIR / "static"]
MEDIA_URL = "media/"
MEDIA_ROOT = Path(env_str("JOBSITE_MEDIA_ROOT", str(VAR_DIR / "media")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

# --- Security (production) ----------------------------------------------------
# https://docs.djangoproject.com/en/5.2/howto/deployment/checklist/

SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", not DEBUG)
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", not DEBUG)
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", not DEBUG)
# Only behind a proxy that sets X-Forwarded-Proto itself (and strips the client's):
# trusted without one, any client could claim https. docs/security.md
JOBSITE_TRUST_X_FORWARDED_PROTO = env_bool("JOBSITE_TRUST_X_FORWARDED_PROTO", False)
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if JOBSITE_TRUST_X_FORWARDED_PROTO else None
)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

# --- Email --------------------------------------------------------------------

EMAIL_BACKEND = env_str("DJANGO_EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_FILE_PATH = env_str("DJANGO_EMAIL_FILE_PATH", str(VAR_DIR / "mail"))
EMAIL_HOST = env_str("DJANGO_EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("DJANGO_EMAIL_PORT", 25)
EMAIL_HOST_USER = os.environ.get("DJANGO_EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("DJANGO_EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("DJANGO_EMAIL_USE_TLS", False)
DEFAULT_FROM_EMAIL = env_str("DJANGO_DEFAULT_FROM_EMAIL", "jobsite@localhost")

# --- Celery -------------------------------------------------------------------
# https://docs.celeryq.dev/en/stable/userguide/configuration.html

CELERY_BROKER_URL = env_broker("CELERY_BROKER_URL", f"redis+socket://{EMBEDDED_REDIS_SOCKET}")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A submit must never hang on a dead broker: connect fast, retry briefly, then give
# up and leave the run stored as unsent (the relay publishes it later).
CELERY_BROKER_CONNECTION_TIMEOUT = 2
# RabbitMQ: seconds between AMQP heartbeats (Celery's default, 120). A worker host cut
# off is noticed by the broker after about twice this; only then do its unacknowledged
# runs go to other workers (docs/fleet.md). 0: none.
CELERY_BROKER_HEARTBEAT = env_int("JOBSITE_BROKER_HEARTBEAT", 120, minimum=0)
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "socket_connect_timeout": 2,
    "socket_timeout": 10,
    # Redis: priorities 0..9 each in its own list, as RabbitMQ's x-max-priority queues.
    # kombu's default key layout (its separator "\x06\x16", no `sep` here) so that
    # Flower, `celery inspect` and producers with kombu's defaults share the broker;
    # the 10 steps include kombu's default ones (0, 3, 6, 9): whatever such a client
    # sends lands in a list Jobsite's workers read. (0.3.1 and before: `sep: ":"`, see
    # CHANGELOG and `manage.py migrate_redis_queues`.)
    "priority_steps": list(range(10)),
    "queue_order_strategy": "priority",
}
# Result backend, worker consumer and beat scheduler: Jobsite's, set by jobs.celery.install
# (jobsite/celery.py); a CELERY_RESULT_BACKEND etc. here would replace them.
CELERY_RESULT_EXTENDED = True
CELERY_TASK_TRACK_STARTED = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_ACCEPT_CONTENT = ["json"]
# Headers-exchange queues only on RabbitMQ (kombu's Redis transport has none).
# RabbitMQ queue type: classic (one node), or quorum (replicated over a cluster; see
# jobs/routing.py and the quorum section below).
JOBSITE_QUEUE_TYPE = env_choice("JOBSITE_QUEUE_TYPE", "classic", routing.QUEUE_TYPES)
JOBSITE_DELIVERY_LIMIT = env_int(
    "JOBSITE_DELIVERY_LIMIT", routing.DEFAULT_DELIVERY_LIMIT, minimum=1
)
CELERY_TASK_QUEUES = routing.queues_for(
    CELERY_BROKER_URL, JOBSITE_QUEUE_TYPE, JOBSITE_DELIVERY_LIMIT
)
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_DEFAULT_EXCHANGE = "default"
CELERY_TASK_DEFAULT_ROUTING_KEY = "default"
CELERY_TASK_DEFAULT_PRIORITY = 5
CELERY_TASK_QUEUE_MAX_PRIORITY: int | None = 10
# acks_late runs (job types with the duplicate guard, or declared so) count against a
# worker's prefetch window while they execute: with 1, a pool process that finishes
# sits idle while the worker asks the broker for its next message (short jobs drain
# slower, see README, Performance).
# 2 keeps one message waiting per pool process; a worker busy with long
# jobs holds at most `concurrency` messages back from other workers (Celery's own
# default, 4, would hold three times that). Set 1 for workers that run only long jobs.
CELERY_WORKER_PREFETCH_MULTIPLIER = env_int("CELERY_WORKER_PREFETCH_MULTIPLIER", 2, minimum=0)
CELERY_WORKER_SEND_TASK_EVENTS = False
# Rolling restarts (docs/fleet.md): SIGTERM is Celery's warm shutdown (no new messages,
# the runs in hand finish). Celery 5.5+'s soft shutdown gives those runs this many more
# seconds once a cold shutdown is asked (SIGQUIT, a second SIGTERM) before they are cut
# off; unfinished acks_late runs then go back to the queue. 0 (Celery's default): off.
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = float(env_int("JOBSITE_SOFT_SHUTDOWN_TIMEOUT", 0))


# --- Quorum queues (JOBSITE_QUEUE_TYPE=quorum, RabbitMQ 3.10+) -------------------
# https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/rabbitmq.html#using-quorum-queues
# https://www.rabbitmq.com/docs/quorum-queues
# A vhost's queues keep the type they were declared with: switching an existing vhost
# means a new vhost (or deleting Jobsite's queues and the "default" exchange, which
# becomes a topic exchange). Priorities are lost: quorum queues in RabbitMQ 3.x
# deliver in publish order whatever a message's priority.
if JOBSITE_QUEUE_TYPE == "quorum":
    if not routing.is_rabbitmq(CELERY_BROKER_URL):
        raise ImproperlyConfigured(
            "JOBSITE_QUEUE_TYPE=quorum needs a RabbitMQ broker (CELERY_BROKER_URL=amqp://...)."
        )
    # A submit returns only once the broker has the message (on a cluster: once a
    # majority of the queue's members have it), or raises and leaves the run unsent.
    CELERY_BROKER_TRANSPORT_OPTIONS["confirm_publish"] = True
    # Countdown and ETA through RabbitMQ's delay queues rather than held by a worker:
    # quorum queues have no global QoS, so a worker cannot widen its prefetch window
    # for the runs it holds (Celery declares the celery_delayed_* queues on start).
    CELERY_BROKER_NATIVE_DELAYED_DELIVERY_QUEUE_TYPE = "quorum"
    # Per-consumer QoS: a quorum queue refuses global basic.qos (Celery's default).
    CELERY_WORKER_DETECT_QUORUM_QUEUES = True
    # A queue Celery creates itself (task_create_missing_queues: a queue named in a
    # schedule or a submit that Jobsite does not declare) is a quorum queue too, on a
    # topic exchange of its own name; it has no delivery limit and no dead-lettering.
    CELERY_TASK_CREATE_MISSING_QUEUE_TYPE = "quorum"
    CELERY_TASK_CREATE_MISSING_QUEUE_EXCHANGE_TYPE = "topic"
    CELERY_TASK_DEFAULT_EXCHANGE_TYPE = "topic"  # "default", as jobs/routing.py declares it
    # Celery adds x-max-priority to every queue with this set: a quorum queue refuses it.
    CELERY_TASK_QUEUE_MAX_PRIORITY = None
# The worker's main process stores the final states of successful runs in batches, and
# acknowledges acks_late runs once theirs is stored (jobs.commit; PostgreSQL, prefork).
# The demo job types, workflows and benchmark tasks (jobs/tasks/).
JOBSITE_DEMO_JOB_TYPES = env_bool("JOBSITE_DEMO_JOB_TYPES", True)
JOBSITE_GROUP_COMMIT = env_bool("JOBSITE_GROUP_COMMIT", True)
# How long (ms) the first run of a batch waits for others to join it: one statement costs
# about as much for one run as for twenty, so under load this is what keeps tracking
# cheap; idle, each final state and ack comes this much later.
JOBSITE_GROUP_COMMIT_WAIT_MS = env_int("JOBSITE_GROUP_COMMIT_WAIT_MS", 20, minimum=0)
CELERY_TIMEZONE = TIME_ZONE
# Beat: django-celery-beat's DatabaseScheduler behind a Redis lock, so exactly one beat
# fires (jobs.beat:JobsiteScheduler, set by jobs.celery.install).
CELERY_TASK_ALWAYS_EAGER = False
# Celery's Django fix-up closes the database connection around every task unless this
# is set, and reconnecting costs more than the task (see README, Performance). Pool
# processes keep their connection; jobs.signals checks it is usable before a task that
# follows a pause of a second or more (back to back, a broken connection fails the final
# write, which reconnects and stores it again: CELERY_RESULT_BACKEND_ALWAYS_RETRY).
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1000, minimum=0)

# --- Jobsite ------------------------------------------------------------------

# Redis for Jobsite's own markers and locks (separate from the broker, which may be
# RabbitMQ). Embedded default: the private Redis server, database 1.
JOBSITE_REDIS_URL = env_redis("JOBSITE_REDIS_URL", f"unix://{EMBEDDED_REDIS_SOCKET}?db=1")
# Largest accepted parameter payload (bytes of JSON).
JOBSITE_MAX_PARAMS_BYTES = env_int("JOBSITE_MAX_PARAMS_BYTES", 64 * 1024, minimum=1)
# History and API page size.
JOBSITE_PAGE_SIZE = env_int("JOBSITE_PAGE_SIZE", 50, minimum=1)

# --- Abuse limits: submit rate, how far ahead a run may be put off ---------------
# docs/security.md. Submits per user (web form, API submit, API bulk request alike):
# "<number>/<s|min|hour|day>". Counted in Jobsite's Redis (JOBSITE_REDIS_URL), so that
# every web process shares one budget per user.
JOBSITE_SUBMIT_RATE = env_str("JOBSITE_SUBMIT_RATE", "60/min")
try:
    _count, _period = JOBSITE_SUBMIT_RATE.split("/")
    if int(_count) < 1 or _period[:1] not in ("s", "m", "h", "d"):
        raise ValueError
except ValueError:
    raise ImproperlyConfigured(
        f"JOBSITE_SUBMIT_RATE={JOBSITE_SUBMIT_RATE!r} is not a rate such as 60/min."
    ) from None
# The latest start (ETA, countdown) a submit may ask for, in days; on a Redis broker
# also at most the visibility timeout (JOBSITE_REDIS_VISIBILITY_TIMEOUT).
JOBSITE_MAX_ETA_DAYS = env_int("JOBSITE_MAX_ETA_DAYS", 30, minimum=1)

# --- Schedules (beat) -----------------------------------------------------------
# https://django-celery-beat.readthedocs.io/en/latest/

# Seconds the beat lock lives without renewal (beat renews it several times per TTL).
# A standby beat takes over within this time when the active one dies; the schedule
# admin warns that beat is not running when its heartbeat is older than this.
JOBSITE_BEAT_LOCK_TTL = env_int("JOBSITE_BEAT_LOCK_TTL", 30, minimum=3)
# Seconds ahead of its due time beat may send a recurring run, with that due time as
# its ETA (the worker starts it no earlier): thousands of runs due in the same second
# are then published before it, not seconds after. 0 sends each run when it is due.
JOBSITE_BEAT_LEAD = env_int("JOBSITE_BEAT_LEAD", 10, minimum=0)

# --- JSON API (Django REST framework + drf-spectacular) -------------------------
# https://www.django-rest-framework.org/api-guide/settings/
# https://drf-spectacular.readthedocs.io/en/latest/settings.html

REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header turns "no credentials" into a 401.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "jobs.api.auth.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON only: no browsable API, no form-encoded bodies.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Jobsite API",
    "DESCRIPTION": "Submit Celery jobs, follow their runs, list job types and schedules. "
    "Authenticate with `Authorization: Bearer <token>` (create one on "
    "[your tokens page](/account/tokens/)) or a browser session. [Back to Jobsite](/)",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI's JS and CSS are served from the drf-spectacular-sidecar wheel: no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Metrics and alerts ---------------------------------------------------------
# https://prometheus.github.io/client_python/

# /metrics: a bearer token, and/or client addresses or networks (comma-separated,
# e.g. 10.0.0.0/8,127.0.0.1). With neither, only staff sessions may read it.
JOBSITE_METRICS_TOKEN = os.environ.get("JOBSITE_METRICS_TOKEN", "")
JOBSITE_METRICS_ALLOW = env_list("JOBSITE_METRICS_ALLOW", [])
for _network in JOBSITE_METRICS_ALLOW:
    try:
        ipaddress.ip_network(_network, strict=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"JOBSITE_METRICS_ALLOW: {_network!r} is not an IP address or network."
        ) from None
# Links in alert messages point here, e.g. https://jobs.example.com
JOBSITE_BASE_URL = env_str("JOBSITE_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
# A schedule is missed when its run is this late; beat or the workers are lost when
# silent for this long.
JOBSITE_ALERT_SCHEDULE_GRACE = env_int("JOBSITE_ALERT_SCHEDULE_GRACE", 120, minimum=1)
JOBSITE_ALERT_HEARTBEAT_GRACE = env_int("JOBSITE_ALERT_HEARTBEAT_GRACE", 180, minimum=1)
# Webhook delivery: timeout per attempt, attempts, and the first backoff (doubled).
JOBSITE_ALERT_WEBHOOK_TIMEOUT = env_int("JOBSITE_ALERT_WEBHOOK_TIMEOUT", 5, minimum=1)
JOBSITE_ALERT_WEBHOOK_ATTEMPTS = env_int("JOBSITE_ALERT_WEBHOOK_ATTEMPTS", 3, minimum=1)
JOBSITE_ALERT_WEBHOOK_BACKOFF = 0.5
# Webhooks are never sent to loopback, private, link-local, multicast, reserved or
# unspecified addresses, except to these hosts (names, addresses or networks such as
# 10.0.0.0/8), comma-separated. docs/security.md
JOBSITE_WEBHOOK_ALLOWED_HOSTS = env_list("JOBSITE_WEBHOOK_ALLOWED_HOSTS", [])
# How often beat runs the alert check (seconds). DatabaseScheduler copies
# CELERY_BEAT_SCHEDULE into its PeriodicTask table when beat starts, so the check
# shows in the admin's periodic tasks with no data migration.
JOBSITE_ALERTS_CHECK_EVERY = env_int("JOBSITE_ALERTS_CHECK_EVERY", 60, minimum=5)
CELERY_BEAT_SCHEDULE = {
    **globals().get("CELERY_BEAT_SCHEDULE", {}),  # keeps entries other sections declared
    "jobsite-alerts-check": {
        "task": "jobsite.alerts_check",
        "schedule": float(JOBSITE_ALERTS_CHECK_EVERY),
        # A check that could not start in time is replaced by the next one.
        "options": {"queue": "default", "expire_seconds": JOBSITE_ALERTS_CHECK_EVERY},
    },
}

# --- Reliability: relay, stale runs, retention, broker faults -------------------

# Runs stored while the broker was down are published by the relay (a beat task and
# `manage.py relay`); a run whose worker is silent this long is marked LOST.
JOBSITE_RELAY_EVERY = env_int("JOBSITE_RELAY_EVERY", 15, minimum=1)
JOBSITE_LOST_AFTER = env_int("JOBSITE_LOST_AFTER", 300, minimum=10)
# Redis broker: a run sent this long ago that no worker received and whose message is
# no longer on the broker (kombu#305) is sent again by the reconciliation (mark_lost).
JOBSITE_REDIS_RESEND_AFTER = env_int("JOBSITE_REDIS_RESEND_AFTER", 120, minimum=1)
JOBSITE_RETENTION_DAYS = env_int("JOBSITE_RETENTION_DAYS", 30, minimum=1)
# The event recorder (manage.py record_events): events per stored batch, the longest
# one waits in a batch (ms), and on RabbitMQ what its durable queue keeps while it is
# down: at most this many events (then the oldest go), each for at most this long (s).
JOBSITE_EVENTS_BATCH = env_int("JOBSITE_EVENTS_BATCH", 500, minimum=1)
JOBSITE_EVENTS_FLUSH_MS = env_int("JOBSITE_EVENTS_FLUSH_MS", 200, minimum=1)
JOBSITE_EVENTS_BACKLOG = env_int("JOBSITE_EVENTS_BACKLOG", 1_000_000, minimum=1000)
JOBSITE_EVENTS_TTL = env_int("JOBSITE_EVENTS_TTL", 24 * 3600, minimum=60)
# Largest task message a worker accepts; bigger ones are rejected and audited.
JOBSITE_MAX_MESSAGE_BYTES = env_int("JOBSITE_MAX_MESSAGE_BYTES", 1024 * 1024, minimum=1024)
# Redis broker: an unacknowledged (acks_late) message is redelivered after this many
# seconds when its worker died; keep it above your longest job's runtime or rely on
# the duplicate guard (job types with guard=True) to skip the second copy.
CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] = env_int(
    "JOBSITE_REDIS_VISIBILITY_TIMEOUT", 3600, minimum=1
)
# How often (s) a Redis worker looks for such messages; kombu scans every Nth look.
CELERY_BROKER_TRANSPORT_OPTIONS["unacked_restore_interval"] = env_int(
    "JOBSITE_REDIS_RESTORE_INTERVAL", 10, minimum=1
)
CELERY_BROKER_TRANSPORT_OPTIONS["unacked_restore_throttle"] = env_int(
    "JOBSITE_REDIS_RESTORE_THROTTLE", 10, minimum=1
)
# The lock that lets one worker at a time restore such messages. A worker killed, or a
# server restarted, while holding it leaves it held until it expires: kombu's 300 s
# would hold every redelivery back that long.
CELERY_BROKER_TRANSPORT_OPTIONS["unacked_mutex_expire"] = env_int(
    "JOBSITE_REDIS_RESTORE_MUTEX_EXPIRE", 60, minimum=1
)
# A dropped database connection under the worker (a restart, a fail-over): reconnect and
# store again, backing off up to 2 s a try, for about a minute, before giving up on the
# run's state (after five tries, a 2 s restart lost runs: their states never stored).
CELERY_RESULT_BACKEND_ALWAYS_RETRY = True
CELERY_RESULT_BACKEND_MAX_RETRIES = 80
CELERY_RESULT_BACKEND_BASE_SLEEP_BETWEEN_RETRIES_MS = 50
CELERY_RESULT_BACKEND_MAX_SLEEP_BETWEEN_RETRIES_MS = 2000
# Malformed, oversize and unknown messages are recorded, not only logged, by Jobsite's
# worker consumer (jobs.worker.consumer:JobsiteConsumer, set by jobs.celery.install).
CELERY_BEAT_SCHEDULE = {
    **globals().get("CELERY_BEAT_SCHEDULE", {}),
    "jobsite-relay": {
        "task": "jobsite.relay",
        "schedule": float(JOBSITE_RELAY_EVERY),
        "options": {"queue": "default", "expire_seconds": JOBSITE_RELAY_EVERY},
    },
    "jobsite-mark-lost": {
        "task": "jobsite.mark_lost",
        "schedule": 60.0,
        "options": {"queue": "default", "expire_seconds": 60},
    },
    "jobsite-cleanup": {
        "task": "jobsite.cleanup",
        "schedule": 3600.0,
        "options": {"queue": "default", "expire_seconds": 3600},
    },
}

# --- Serialisation, compression and message signing -----------------------------
# https://docs.celeryq.dev/en/stable/userguide/calling.html#serializers
# https://docs.celeryq.dev/en/stable/userguide/security.html#message-signing

# Task messages in JSON (default) or msgpack; results stay JSON (they are stored as
# JSON). Pickle is never accepted: a pickled message is refused, not executed.
JOBSITE_SERIALIZER = env_str("JOBSITE_SERIALIZER", "json").lower()
if JOBSITE_SERIALIZER not in ("json", "msgpack"):
    raise ImproperlyConfigured("JOBSITE_SERIALIZER must be json or msgpack (never pickle).")
CELERY_TASK_SERIALIZER = JOBSITE_SERIALIZER
CELERY_ACCEPT_CONTENT = ["json"] if JOBSITE_SERIALIZER == "json" else ["msgpack", "json"]
# Compress every task message (job types may also set their own `compression`).
JOBSITE_COMPRESSION = env_str("JOBSITE_COMPRESSION", "").lower()
if JOBSITE_COMPRESSION not in ("", "zlib", "bzip2"):
    raise ImproperlyConfigured("JOBSITE_COMPRESSION must be empty, zlib or bzip2.")
CELERY_TASK_COMPRESSION = JOBSITE_COMPRESSION or None
# Message signing (Celery's `auth` serializer): this process's private key and
# certificate, and a directory of the certificates whose signatures are trusted.
# All three or none; with them, only signed messages are accepted.
_SIGNING = {name: env_str(f"JOBSITE_SIGNING_{name}", "") for name in ("KEY", "CERT", "CERT_STORE")}
JOBSITE_SIGNING = any(_SIGNING.values())
if JOBSITE_SIGNING:
    for _name, _path in _SIGNING.items():
        if not _path or not Path(_path).exists():
            raise ImproperlyConfigured(
                f"JOBSITE_SIGNING_{_name} must name an existing file or directory "
                "(set JOBSITE_SIGNING_KEY, _CERT and _CERT_STORE together)."
            )
    CELERY_SECURITY_KEY = _SIGNING["KEY"]
    CELERY_SECURITY_CERTIFICATE = _SIGNING["CERT"]
    CELERY_SECURITY_CERT_STORE = str(Path(_SIGNING["CERT_STORE"]) / "*.pem")
    CELERY_SECURITY_DIGEST = "sha256"
    CELERY_TASK_SERIALIZER = "auth"
    CELERY_ACCEPT_CONTENT = ["auth"]  # jobsite/celery.py calls app.setup_security()

# --- Logging ------------------------------------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("DJANGO_LOG_LEVEL", "INFO")},
}
