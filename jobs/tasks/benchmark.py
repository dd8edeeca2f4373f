"""Benchmark tasks (bench/tracking.py).

`noop` measures what tracking costs: a catalogued job that does nothing, fully
tracked. `jobsite.bench_noop` is the same with no tracking at all (named jobsite.*,
so never a run), only counting itself in Redis so that the benchmark knows when the
raw queue has drained.
"""

from __future__ import annotations

import functools
import logging

from celery import shared_task
from django import forms

from jobs import catalog, redis

logger = logging.getLogger(__name__)


class NoopParams(forms.Form):
    """No parameters."""


@catalog.job(
    name="jobs.noop",
    form=NoopParams,
    title="No-op (benchmark)",
    description="Does nothing: used to measure what run tracking costs.",
    queue="default",
    # Benchmarks send it to their own queue, so that no other worker takes their runs.
    queues=("default", "bench"),
    # Acknowledged once its final state is stored, as the tracking benchmark measures.
    acks_late=True,
)
def noop(self) -> dict:
    return {}


BENCH_COUNTER_KEY = "jobsite:bench:noop_raw"


@functools.cache
def _bench_redis():
    return redis.client()  # one connection pool per worker process


@shared_task(name="jobsite.bench_noop", ignore_result=True)
def bench_noop() -> None:
    _bench_redis().incr(BENCH_COUNTER_KEY)
