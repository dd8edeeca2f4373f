"""Schedulers for bench.beat: Jobsite's and the stock one, each recording its lag.

For every entry sent, one line ``<name> <lag seconds>`` goes to $BENCH_BEAT_LAG_FILE:
the time the publish returned minus the time the entry was due by its own schedule.
The probe is the same for both, so it costs both the same.
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
        lag = entry.schedule.now().timestamp() - due
        if self._lag_out is None:
            self._lag_out = open(os.environ["BENCH_BEAT_LAG_FILE"], "a", buffering=1)  # noqa: SIM115
        self._lag_out.write(f"{entry.name} {lag:.4f}\n")


class ProbeJobsiteScheduler(_Probe, JobsiteScheduler):
    pass


class ProbeDatabaseScheduler(_Probe, DatabaseScheduler):
    pass
