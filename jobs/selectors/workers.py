"""Workers through Celery's remote control (broadcast over the broker)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import current_app

logger = logging.getLogger(__name__)

INSPECT_TIMEOUT = 1.0


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


def workers_online(timeout: float = INSPECT_TIMEOUT) -> list[str]:
    """Names of the workers that answer a ping (empty if the broker is down)."""
    try:
        replies = current_app.control.ping(timeout=timeout) or []
    except Exception as exc:
        logger.warning("Could not ping workers: %s", exc)
        return []
    return sorted(name for reply in replies for name in reply)


def workers_inspect(timeout: float = INSPECT_TIMEOUT) -> list[WorkerInfo]:
    """Everything the workers report about themselves, one entry per online worker."""
    try:
        # Who is online is only known after the timeout: Celery waits it out when it
        # does not know how many replies to expect.
        stats = current_app.control.inspect(timeout=timeout).stats() or {}
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
        queues=[q["name"] for q in answers["active_queues"].get(name, [])],
    )
