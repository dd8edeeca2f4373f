"""A real `celery beat` with Jobsite's scheduler, a real broker and a real worker.

Each beat runs a few seconds with --max-interval 1 (so it sees changes within a second)
and JOBSITE_BEAT_LOCK_TTL=3 (so a standby beat's takeover is quick).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.urls import reverse
from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

from jobs import heartbeat, redis
from jobs.beat import scheduler as beat
from jobs.models import Job, JobSource
from tests.admin.test_schedules import form_data
from tests.conftest import ROOT

pytestmark = pytest.mark.broker

SCHEDULER = "jobs.beat:JobsiteScheduler"


class Beat:
    """A `celery beat` subprocess with the worker's environment (same DB and broker)."""

    def __init__(self, env: dict, name: str) -> None:
        self.log = Path(tempfile.mkdtemp(prefix=f"jobsite-beat-{name}-")) / "beat.log"
        self.env = {**env, "JOBSITE_BEAT_LOCK_TTL": "3"}
        argv = [
            sys.executable, "-m", "celery", "-A", "jobsite", "beat", "-S", SCHEDULER,
            "--max-interval", "1", "--loglevel=INFO",
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def sent(self, name: str) -> int:
        return self.output().count(f"Sending due task {name} ")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"beat never logged {text!r}:\n{self.output()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_beat(worker) -> Iterator:
    """Start beats beside the test's worker; all are stopped before the DB is flushed."""
    redis.client().delete(beat.LOCK_NAME, heartbeat.BEAT_KEY)
    beats: list[Beat] = []

    def start(name: str = "a") -> Beat:
        process = Beat(worker.env, name)
        beats.append(process)
        return process

    yield start
    for process in beats:
        process.stop()
    redis.client().delete(beat.LOCK_NAME)


def every(seconds: int) -> IntervalSchedule:
    interval, _ = IntervalSchedule.objects.get_or_create(every=seconds, period="seconds")
    return interval


def make_schedule(name: str, seconds: int, **fields) -> PeriodicTask:
    return PeriodicTask.objects.create(
        name=name,
        task="jobs.count_primes",
        kwargs='{"limit": 100}',
        interval=every(seconds),
        queue="cpu",
        **fields,
    )


def runs_of(schedule: PeriodicTask):
    return Job.objects.filter(schedule=schedule)


def wait_for_runs(schedule: PeriodicTask, count: int, *, timeout: float = 30) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = list(runs_of(schedule).filter(state="SUCCESS"))
        if len(runs) >= count:
            return runs
        time.sleep(0.2)
    raise AssertionError(f"{schedule.name}: {runs_of(schedule).count()} runs, wanted {count}")


def test_beat_fires_a_one_second_schedule_and_its_runs_are_linked_to_it(
    start_beat, job_types, admin_client_for_beat
):
    schedule = make_schedule("every second", 1)
    PeriodicTask.objects.create(
        name="typed in", task="os.system", kwargs='{"command": "true"}', interval=every(1)
    )
    process = start_beat()

    runs = wait_for_runs(schedule, 4)

    process.wait_for_log("Schedule 'typed in' is not sent")
    assert all(run.source == JobSource.BEAT for run in runs)
    assert all(run.schedule_name == "every second" for run in runs)
    assert all(run.job_type == job_types["count_primes"] for run in runs)
    assert all(run.params == {"limit": 100} and run.result["primes"] == 25 for run in runs)
    assert all(run.queue == "cpu" for run in runs)
    # Sent ahead (JOBSITE_BEAT_LEAD) with the due time as ETA: never started before it.
    ahead = [run for run in runs if run.eta is not None]
    assert len(ahead) >= 2, [(run.received_at, run.eta) for run in runs]
    assert all(run.started_at >= run.eta for run in ahead)
    # First seen when the worker received it (not when it started, after its ETA).
    assert all(run.created_at == run.received_at <= run.started_at for run in runs), [
        (run.created_at, run.received_at, run.started_at) for run in runs
    ]
    assert not Job.objects.filter(task_name="os.system").exists()
    assert heartbeat.beat_last_seen() is not None
    history = admin_client_for_beat.get(reverse("jobs-history"), {"schedule": "every second"})
    assert all(f"/runs/{run.pk}/" in history.content.decode() for run in runs)
    process.stop()  # beat writes its last run times when it stops (and every 10 s)
    schedule.refresh_from_db()
    assert schedule.total_run_count >= 3 and schedule.last_run_at is not None


def test_editing_the_interval_in_the_admin_changes_the_cadence_without_restarting_beat(
    start_beat, job_types, admin_client_for_beat
):
    schedule = make_schedule("hourly at first", 3600)
    # Beat's and the worker's positive signal: a run of the probe is a tick of beat (and a
    # message the worker processed) after beat read the other schedules.
    probe = make_schedule("probe", 1)
    process = start_beat()
    process.wait_for_log("it is active")
    wait_for_runs(probe, 2)  # nothing of the hourly schedule is due for an hour
    assert process.sent("hourly at first") == 0
    assert not runs_of(schedule).exists()

    data = form_data(
        job_types["count_primes"],
        name=schedule.name,
        interval=str(every(1).pk),
        priority="5",
        **{"params-limit": "100"},
    )
    response = admin_client_for_beat.post(
        reverse("admin:django_celery_beat_periodictask_change", args=[schedule.pk]), data
    )
    assert response.status_code == 302, response.content.decode()[:3000]

    wait_for_runs(schedule, 2)
    schedule.interval = every(3600)
    schedule.save()
    ticks = len(wait_for_runs(probe, 1))
    # Three probe runs later, the change has reached beat (it checks every second) ...
    wait_for_runs(probe, ticks + 3)
    settled, sent = runs_of(schedule).count(), process.sent("hourly at first")
    # ... and three more later, beat has sent nothing more for the hourly schedule.
    wait_for_runs(probe, ticks + 6)
    assert process.sent("hourly at first") == sent
    assert runs_of(schedule).count() == settled
    assert process.process.poll() is None  # the same beat throughout


def test_disabling_a_schedule_cancels_its_run_already_sent_ahead(start_beat, job_types):
    schedule = make_schedule("disabled soon", 6)
    process = start_beat()
    first = wait_for_runs(schedule, 1)[0]  # sent when beat started; the next goes ahead
    deadline = time.monotonic() + 10
    while process.sent("disabled soon") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.sent("disabled soon") == 2, process.output()[-3000:]

    # As the admin's "disable" action does (a queryset update, and the change flag).
    PeriodicTask.objects.filter(pk=schedule.pk).update(enabled=False)
    PeriodicTasks.update_changed()

    process.wait_for_log("Schedule 'disabled soon' was disabled or deleted")
    cancelled = wait_for_state(schedule, "REVOKED", timeout=15)
    assert cancelled.pk != first.pk
    assert cancelled.error_message == "Cancelled before it started"
    assert cancelled.result is None  # never executed
    assert runs_of(schedule).filter(state="SUCCESS").count() == 1


def wait_for_state(schedule: PeriodicTask, state: str, *, timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = runs_of(schedule).filter(state=state).first()
        if run is not None:
            return run
        time.sleep(0.1)
    runs = list(runs_of(schedule).values_list("state", flat=True))
    raise AssertionError(f"{schedule.name}: no {state} run in {timeout}s: {runs}")


def test_a_second_beat_stands_by_and_does_not_double_the_runs(start_beat, job_types):
    schedule = make_schedule("not twice", 1)
    first = start_beat("first")
    first.wait_for_log("it is active")
    second = start_beat("second")
    second.wait_for_log("this beat is on standby")

    wait_for_runs(schedule, 4)

    assert first.sent("not twice") >= 4
    assert second.sent("not twice") == 0
    assert runs_of(schedule).count() <= first.sent("not twice")  # every run sent by the first

    first.stop()  # releases the lock: the standby takes over
    second.wait_for_log("it is active")
    deadline = time.monotonic() + 30
    while second.sent("not twice") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert second.sent("not twice") >= 2
    # The run the first beat sent ahead before it stopped still runs, at its due time;
    # the second beat, which read the first one's last run time, does not send it again.
    wait_for_runs(schedule, first.sent("not twice") + 1)
    runs = list(runs_of(schedule))
    assert len(runs) <= first.sent("not twice") + second.sent("not twice")
    due_times = [run.eta for run in runs if run.eta is not None]
    assert len(due_times) == len(set(due_times))  # no due time run twice


# --- Helpers --------------------------------------------------------------------------


@pytest.fixture
def admin_client_for_beat(client, admin_user):
    client.force_login(admin_user)
    return client


def test_the_pages_show_the_leader_and_a_standby_taking_over_when_it_is_killed(
    start_beat, job_types, admin_client_for_beat
):
    """Issue 25 item 3: which beat holds the lock, which stands by; the leader SIGKILLed
    (no goodbye, its lock left to expire) and the standby shown leading within the TTL."""
    import os
    import signal
    import socket

    changelist = reverse("admin:django_celery_beat_periodictask_changelist")
    first = start_beat("first")
    first.wait_for_log("it is active")
    second = start_beat("second")
    second.wait_for_log("this beat is on standby")
    host = socket.gethostname()

    def shown() -> tuple[str, str]:
        page = admin_client_for_beat.get(changelist).content.decode()
        dashboard = admin_client_for_beat.get(reverse("jobs-dashboard-system")).content.decode()
        return page, dashboard

    deadline = time.monotonic() + 10
    while f"{host} (pid {second.process.pid})" not in shown()[0]:
        assert time.monotonic() < deadline, shown()[0][-3000:]
        time.sleep(0.3)
    page, dashboard = shown()
    assert f'<strong>Leader:</strong> <span class="mono">{host} (pid {first.process.pid})' in page
    assert f'Standby: <span class="mono">{host} (pid {second.process.pid})' in page
    assert f"{host} (pid {first.process.pid})" in dashboard.split('id="beat-leader"')[1]

    os.kill(first.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    second.wait_for_log("it is active", timeout=15)
    leader = f'<strong>Leader:</strong> <span class="mono">{host} (pid {second.process.pid})'
    while leader not in shown()[0]:
        assert time.monotonic() - killed_at < 15, shown()[0][-3000:]
        time.sleep(0.3)
    took = time.monotonic() - killed_at
    page, dashboard = shown()
    assert (
        f'Silent: <span class="mono">{host} (pid {first.process.pid})</span> (was active)' in page
    )
    assert f"{host} (pid {second.process.pid})" in dashboard.split('id="beat-leader"')[1]
    print(f"\nbeat takeover shown {took:.1f} s after the leader was killed (lock TTL 3 s)")
