"""Prometheus metrics at /metrics (prometheus-client's exposition format).

Everything is read at scrape time from the database, the broker and Redis by a custom
collector, rather than kept as in-process counters. Counters would have to be bumped
in the worker (a cost on the hot path), summed across prefork children (prometheus
multiprocess mode, files on disk) and reset on every restart; the database already
holds every run, so a bounded, indexed read per scrape is both cheaper and exact:

- ``jobsite_runs{job_type,state}``: runs submitted in the last 24 h (a gauge); runs of
  tasks outside the catalogue count under ``job_type="other"``, so task names from the
  wire never add series;
- ``jobsite_run_duration_seconds``: a *gauge histogram* of the runtimes of the runs
  that finished in the last 15 minutes. It describes a sliding window, so it can go
  down: query it directly (``histogram_quantile(0.95, jobsite_run_duration_seconds_bucket)``),
  not through ``rate()``;
- queue depth and consumers per queue (no consumers sample where the broker keeps no
  count: Redis), workers online, beat last seen (unix time, 0 when beat was never seen).
  No scrape waits on a remote-control ping: workers online is the last answer, refreshed
  in the background (jobs.selectors.stats.workers_answering).

Access: a bearer token (``JOBSITE_METRICS_TOKEN``), or a client address in
``JOBSITE_METRICS_ALLOW``, or a staff session. Anything else is a 401 (no credentials)
or a 403 (wrong credentials, or a logged-in non-staff user).
"""

from __future__ import annotations

import hmac
import ipaddress
from datetime import timedelta
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from jobs.selectors import stats

RUNS_WINDOW = timedelta(hours=24)
HISTOGRAM_WINDOW = timedelta(minutes=15)
BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
CACHE_SECONDS = 10


def _database_figures() -> dict:
    now = timezone.now()
    return {
        "runs": stats.runs_by_type_and_state(since=now - RUNS_WINDOW),
        "histogram": stats.runtime_histogram(since=now - HISTOGRAM_WINDOW, buckets=BUCKETS),
    }


class JobsiteCollector:
    def collect(self):
        figures = cast(
            dict[str, Any],
            cache.get_or_set("jobsite:metrics:db", _database_figures, CACHE_SECONDS),
        )
        yield self._runs(figures["runs"])
        yield self._durations(figures["histogram"])
        yield from self._system(stats.system_status())

    def _runs(self, runs) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "jobsite_runs",
            "Runs submitted in the last 24 hours, by job type and current state.",
            labels=["job_type", "state"],
        )
        for (job_type, state), count in sorted(runs.items()):
            family.add_metric([job_type, state], count)
        return family

    def _durations(self, histogram) -> GaugeHistogramMetricFamily:
        family = GaugeHistogramMetricFamily(
            "jobsite_run_duration_seconds",
            "Runtime of the runs that finished in the last 15 minutes (a sliding window).",
            labels=["job_type"],
        )
        for job_type, data in sorted(histogram.items()):
            buckets = [
                (str(bound), count) for bound, count in zip(BUCKETS, data["buckets"], strict=True)
            ]
            buckets.append(("+Inf", data["count"]))
            family.add_metric([job_type], buckets, data["sum"])
        return family

    def _system(self, system: stats.SystemStatus):
        messages = GaugeMetricFamily(
            "jobsite_queue_messages", "Messages waiting in the queue.", labels=["queue"]
        )
        consumers = GaugeMetricFamily(
            "jobsite_queue_consumers", "Consumers of the queue.", labels=["queue"]
        )
        # Unknown is no sample, never a 0 that looks like a fact: None when the broker
        # could not be asked, and no consumers at all on Redis, which keeps no count.
        counts_consumers = system.broker == "RabbitMQ"
        for queue in system.queues:
            if queue.messages is not None:
                messages.add_metric([queue.name], queue.messages)
            if counts_consumers and queue.consumers is not None:
                consumers.add_metric([queue.name], queue.consumers)
        seen = system.beat_last_seen
        yield messages
        yield consumers
        yield GaugeMetricFamily(
            "jobsite_workers_online",
            "Workers that answered the last ping (asked in the background, never waited for).",
            value=len(system.workers),
        )
        yield GaugeMetricFamily(
            "jobsite_beat_last_seen_timestamp_seconds",
            "When beat last ticked (unix time); 0 if it was never seen.",
            value=seen.timestamp() if seen else 0,
        )


# --- Access ----------------------------------------------------------------------------


def _client_allowed(address: str | None) -> bool:
    if not address or not settings.JOBSITE_METRICS_ALLOW:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(
        ip in ipaddress.ip_network(net, strict=False) for net in settings.JOBSITE_METRICS_ALLOW
    )


def _token_matches(header: str) -> bool:
    token = settings.JOBSITE_METRICS_TOKEN
    scheme, _, given = header.partition(" ")
    if not token or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def _refusal(request: HttpRequest) -> HttpResponse | None:
    """None when the request may read the metrics, else the 401/403 to send."""
    header = request.headers.get("Authorization", "")
    if header:
        if _token_matches(header):
            return None
        return HttpResponse("Invalid metrics token.", status=403, content_type="text/plain")
    if _client_allowed(request.META.get("REMOTE_ADDR")):
        return None
    user = request.user
    if user.is_authenticated and user.is_staff:
        return None
    if user.is_authenticated:
        return HttpResponse("Staff only.", status=403, content_type="text/plain")
    response = HttpResponse(
        "Authentication required: send the metrics bearer token.",
        status=401,
        content_type="text/plain",
    )
    response["WWW-Authenticate"] = 'Bearer realm="jobsite-metrics"'
    return response


@login_not_required
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsiteCollector())
    # The classic text format unless the scraper asks for OpenMetrics (Accept header).
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(registry), content_type=content_type)
