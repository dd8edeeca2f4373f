"""Schedulers for bench.beat: Jobsite's and the stock one, each recording its lag.

For every entry sent, one line ``<name> <lag s> <sent early s> <sent at>`` goes to
$BENCH_BEAT_LAG_FILE. The lag is the time the run became runnable minus the time it
was due by its own schedule: runnable when the publish returned, or, for a run sent
ahead with an ETA (Jobsite's scheduler), at that ETA if the publish returned before
it (a worker does not start it earlier). "Sent early" is how long before its due
time the publish returned (0 if not before). The probe is the same for both.
"""

from __future__ import annotations

import os

from django_celery_beat.schedulers import DatabaseScheduler

from jobs.beat import JobsiteScheduler


class _Probe:
    _lag_out = None

    def apply_entry(self, entry, producer=None):
        remaining = entry.schedule.remaining_estimate(entry.last_run_at).total_seconds()
        due = entry.schedule.now().timestamp() + remaining
        super().apply_entry(entry, producer=producer)
        published = entry.schedule.now().timestamp()
        eta = entry.options.get("eta")
        runnable = max(published, eta.timestamp()) if eta else published
        if self._lag_out is None:
            self._lag_out = open(os.environ["BENCH_BEAT_LAG_FILE"], "a", buffering=1)  # noqa: SIM115
        # max(..., 0): an ETA equal to the due time, read off another clock call, can
        # come out microseconds before it.
        lag, early = max(runnable - due, 0.0), max(due - published, 0.0)
        self._lag_out.write(f"{entry.name} {lag:.4f} {early:.4f} {published:.3f}\n")


class ProbeJobsiteScheduler(_Probe, JobsiteScheduler):
    pass


class ProbeDatabaseScheduler(_Probe, DatabaseScheduler):
    pass
