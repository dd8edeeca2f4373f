"""Workers through Celery's remote control (broadcast over the broker).

A broadcast that does not say how many replies to expect waits out its whole timeout.
The workers that should answer are known from their heartbeats (jobs.heartbeat), so
each call here passes that number as its reply limit and returns as soon as they have
all answered; only a worker that died without a goodbye (SIGKILL, a host cut off, until
its heartbeat is INCARNATION_TTL old) makes a call wait its timeout out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from celery import current_app
from django.core.cache import cache

from jobs import heartbeat

logger = logging.getLogger(__name__)

INSPECT_TIMEOUT = 1.0
# The workers page polls every 5 s; every open page and poll within this share one read.
INSPECT_CACHE_KEY = "jobsite:workers:inspect"
INSPECT_CACHE_SECONDS = 4


@dataclass
class WorkerInfo:
    name: str
    pool: str = ""
    concurrency: int | None = None
    processed: int = 0
    uptime: int | None = None
    loadavg: list = field(default_factory=list)
    active: list = field(default_factory=list)
    reserved: list = field(default_factory=list)
    scheduled: list = field(default_factory=list)
    registered: list = field(default_factory=list)
    queues: list[str] = field(default_factory=list)


def _addressed() -> dict:
    """Whom to ask: the workers known to be there (Jobsite's heartbeats, others' events),
    by name, with as many replies expected; everyone, for the whole timeout, if none is.

    Asking by name matters: a broadcast that only counts replies takes the first ones to
    come, and a worker not counted (another codebase's) would push one of them out.
    """
    names = heartbeat.workers_expected()
    return {"destination": names, "limit": len(names)} if names else {}


def workers_online(timeout: float = INSPECT_TIMEOUT) -> list[str]:
    """Names of the workers that answer a ping (empty if the broker is down)."""
    try:
        replies = current_app.control.ping(timeout=timeout, **_addressed()) or []
    except Exception as exc:
        logger.warning("Could not ping workers: %s", exc)
        return []
    return sorted(name for reply in replies for name in reply)


def workers_inspect_cached() -> list[WorkerInfo]:
    """workers_inspect(), shared for a few seconds by every page and poll that asks."""
    # None only for a None default; workers_inspect always gives a list.
    return cast(
        list[WorkerInfo],
        cache.get_or_set(INSPECT_CACHE_KEY, workers_inspect, INSPECT_CACHE_SECONDS),
    )


def workers_forget() -> None:
    """After a control action: the next page shows what the workers say now."""
    cache.delete(INSPECT_CACHE_KEY)


def workers_inspect(timeout: float = INSPECT_TIMEOUT) -> list[WorkerInfo]:
    """Everything the workers report about themselves, one entry per online worker."""
    try:
        # Who is online: the workers heartbeats and events say are there, asked by name,
        # and no longer than they take to answer.
        stats = current_app.control.inspect(timeout=timeout, **_addressed()).stats()
        stats = stats or {}
        if not stats:
            return []
        # The rest is asked of exactly those workers: each call returns as soon as they
        # have all replied, instead of waiting out its own timeout (six in a row made the
        # workers page take six seconds).
        known = current_app.control.inspect(
            timeout=timeout, destination=sorted(stats), limit=len(stats)
        )
        answers = {
            "active": known.active() or {},
            "reserved": known.reserved() or {},
            "scheduled": known.scheduled() or {},
            "registered": known.registered() or {},
            "active_queues": known.active_queues() or {},
        }
    except Exception as exc:
        logger.warning("Could not inspect workers: %s", exc)
        return []
    return [_info(name, stat, answers) for name, stat in sorted(stats.items())]


def _info(name: str, stat: Mapping[str, Any], answers: dict) -> WorkerInfo:
    pool = stat.get("pool") or {}
    return WorkerInfo(
        name=name,
        # "celery.concurrency.prefork:TaskPool" -> "prefork"
        pool=str(pool.get("implementation", "")).split(":")[0].rsplit(".", 1)[-1],
        concurrency=pool.get("max-concurrency"),
        processed=sum((stat.get("total") or {}).values()),
        uptime=stat.get("uptime"),
        loadavg=list(stat.get("rusage", {}).get("loadavg", []) or stat.get("loadavg", []) or []),
        active=answers["active"].get(name, []),
        reserved=answers["reserved"].get(name, []),
        scheduled=answers["scheduled"].get(name, []),
        registered=answers["registered"].get(name, []),
        # Not the broadcast queue every worker has (routing.BROADCAST_EXCHANGE): Celery's
        # own, not one to consume or stop.
        queues=[
            q["name"]
            for q in answers["active_queues"].get(name, [])
            if not str(q.get("name", "")).startswith("bcast.")
        ],
    )
