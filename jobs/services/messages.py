"""What a run becomes on the wire: its options, its message, the broker breaker, and how
often a user may submit."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from datetime import datetime, timedelta

from celery import current_app
from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone
from redis.exceptions import RedisError

from jobs import redis, routing, specs
from jobs.models import (
    Job,
    JobType,
)

logger = logging.getLogger(__name__)


# Celery's task message headers (protocol 2): a schedule's headers must not replace them.
RESERVED_HEADERS = frozenset(
    {
        "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index",
        "retries", "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr",
        "origin", "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps",
        "periodic_task_name",
    }
)  # fmt: skip


def reserved_headers(headers: dict) -> list[str]:
    """The keys of ``headers`` that would replace Celery's or Jobsite's own headers."""
    return sorted(key for key in headers if key in RESERVED_HEADERS or key.startswith("jobsite_"))


def header_refusal(headers: dict) -> str | None:
    """Why a schedule's stored headers must not be sent (None: they may).

    Beat and run-now both add periodic_task_name themselves, so a stored one is
    overwritten, not sent; the admin form refuses every reserved key up front.
    """
    bad = [key for key in reserved_headers(headers) if key != "periodic_task_name"]
    return f"its headers would replace Celery's: {', '.join(bad)}" if bad else None


def _check_size(params: dict) -> None:
    size = len(json.dumps(params).encode())
    limit = settings.JOBSITE_MAX_PARAMS_BYTES
    if size > limit:
        raise ValidationError(
            f"The parameters are {size:,} bytes; the limit is {limit:,} bytes.", code="too_large"
        )


def _effective_options(job_type: JobType, given: dict) -> dict:
    """The job type's defaults, overridden by what the submitter chose (already validated)."""
    now = timezone.now()

    def pick(name, default):
        value = given.get(name)
        return default if value is None or value == "" else value

    options = {
        "queue": pick("queue", job_type.queue),
        "priority": pick("priority", job_type.priority),
        "max_retries": pick("max_retries", job_type.max_retries),
        "retry_backoff": job_type.retry_backoff,
        "retry_backoff_max": job_type.retry_backoff_max,
        "soft_time_limit": job_type.soft_time_limit,
        "time_limit": job_type.time_limit,
        "idempotency_key": given.get("idempotency_key"),
    }
    run_at: datetime | None = given.get("run_at")
    countdown = pick("countdown", job_type.countdown)
    if run_at:
        options["eta"] = run_at.isoformat()
    elif countdown:
        options["eta"] = (now + timedelta(seconds=countdown)).isoformat()
    expires = pick("expires", job_type.expires)
    if expires:
        start = run_at or now + timedelta(seconds=countdown or 0)
        options["expires_at"] = (start + timedelta(seconds=expires)).isoformat()
    return options


_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
THROTTLE_KEY = "jobsite:throttle:submit:"


def submit_rate_wait(*, user) -> int | None:
    """Count a submit against the user's JOBSITE_SUBMIT_RATE; seconds to wait if over it.

    A sliding log, as Django REST framework's throttles keep, but in Jobsite's Redis (a
    sorted set of submit times per user), so that the web form and the API, in every
    web process, draw on one budget. Not a Django cache alias on that Redis: a cache's
    clear() is FLUSHDB there, and the clear_caches job clears every alias. A refused
    submit is not counted. Two requests at the same instant may both pass (the count
    and the add are two round trips), as with DRF's throttles. If Redis cannot be
    reached the submit is allowed: a rate limit must not make submitting depend on it.
    """
    count, period = settings.JOBSITE_SUBMIT_RATE.split("/")
    number, duration = int(count), _PERIODS[period[0]]
    key, now = f"{THROTTLE_KEY}{user.pk}", time.time()
    try:
        pipe = redis.client().pipeline()
        pipe.zremrangebyscore(key, "-inf", now - duration)
        pipe.zrange(key, 0, -1, withscores=True)
        _, history = pipe.execute()
        if len(history) >= number:
            # Free again when the submit `number` places back leaves the window.
            return max(1, math.ceil(history[len(history) - number][1] + duration - now))
        pipe = redis.client().pipeline()
        pipe.zadd(key, {f"{now:.6f}-{uuid.uuid4().hex[:8]}": now})
        pipe.expire(key, duration)
        pipe.execute()
    except RedisError:
        logger.warning("Submit rate not checked: Jobsite's Redis failed", exc_info=True)
    return None


def submit_rate_message(wait: int) -> str:
    return (
        f"Too many submits: at most {settings.JOBSITE_SUBMIT_RATE} per user "
        f"(JOBSITE_SUBMIT_RATE). Try again in {wait} s."
    )


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class _BrokerBreaker:
    """After a failed publish, skip publishing for a few seconds (per process).

    A dead broker then costs one bounded attempt, not one per request: the runs are
    stored unsent and the relay sends them when the broker is back.
    """

    def __init__(self, pause: float = 5.0) -> None:
        self.pause = pause
        self.open_until = 0.0

    def allows(self) -> bool:
        return time.monotonic() >= self.open_until

    def tripped(self) -> None:
        self.open_until = time.monotonic() + self.pause

    def reset(self) -> None:
        self.open_until = 0.0


broker_breaker = _BrokerBreaker()


def message_options(*, job_type: JobType, params: dict, options: dict) -> dict:
    """What a run's job type declares about its messages, stored in Job.options.

    Its route (exchange, type, routing key, headers and the queues it reaches), rate
    limit, compression and serializer: shown on the run's page. Raises ValidationError
    for a route the broker cannot deliver (headers on Redis, or no queue bound).
    """

    conf = current_app.conf
    spec = specs.get(job_type.name)
    extra = {"serializer": conf.task_serializer, "compression": conf.task_compression}
    if spec is None:
        return extra
    if spec.route:
        extra.update(routing.route_options(spec.route, params, conf.broker_url))
        if options.get("eta") and routing.uses_quorum(conf.task_queues or ()):
            routing.check_delayable(extra)
    else:
        # Celery publishes direct routes through the AMQP default exchange ("").
        extra.update(exchange="", exchange_type="direct", routing_key=options["queue"])
    for name in ("rate_limit", "compression"):
        if spec.task_options.get(name):
            extra[name] = spec.task_options[name]
    return extra


def message_kwargs(*, job: Job, headers: dict) -> dict:
    """``send_task`` routing arguments for a stored run (queue or exchange + key)."""

    options = job.options
    kwargs = {
        # The setting, not the task class's copy of it (taken when the task was bound).
        "serializer": current_app.conf.task_serializer,
        "priority": routing.wire_priority(job.priority, current_app.conf.broker_url),
        "headers": {**headers, **options.get("route_headers", {})},
    }
    if options.get("route"):
        queues = tuple(current_app.conf.task_queues or routing.QUEUES)
        kwargs.update(routing.publish_kwargs(options, queues))
    else:
        kwargs["queue"] = job.queue or None
        # A schedule may name its exchange and routing key (django-celery-beat fields).
        kwargs.update({k: options[k] for k in ("exchange", "routing_key") if options.get(k)})
    if options.get("compression"):
        kwargs["compression"] = options["compression"]
    return kwargs
