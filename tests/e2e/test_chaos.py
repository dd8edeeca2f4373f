"""Chaos: whole workers SIGKILLed at random moments and restarted under their names.

On each broker, two prefork workers (2 processes each) drain guarded e-mail runs
(send_mail; its side effect, a file per message, is written outside the database)
while a supervisor loop kills a whole worker (main process and pool: its process
group) mid-drain and starts it again under the same name, as systemd or Kubernetes
would. Reconciliation runs as beat would run it (jobs_mark_lost), only more often.

Asserted: every run reaches its final state, none is lost (each mail sent at least
once), and the runs that ran twice are at most kills x pool size. The figures are
printed (run with -s to see them).

Fast by default (CI): CHAOS_RUNS=300, CHAOS_KILLS=3 per broker, well under 2 minutes.
The long run: CHAOS_RUNS=3000 CHAOS_KILLS=6 python -m pytest -s tests/e2e/test_chaos.py
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from jobs import services
from jobs.models import FINISHED_STATES, Job
from jobsite.celery import app as celery_app
from tests.conftest import BROKERS, Worker, _reachable, service_unavailable, use_broker

pytestmark = [pytest.mark.broker, pytest.mark.chaos]

RUNS = int(os.environ.get("CHAOS_RUNS", "300"))
KILLS = int(os.environ.get("CHAOS_KILLS", "3"))
SEED = int(os.environ.get("CHAOS_SEED", str(random.randrange(1_000_000))))
POOL = 2
QUEUE = "chaosq"
DRAIN_TIMEOUT = 60 + RUNS / 10  # seconds after the last kill
RECONCILE_EVERY = 2.0  # seconds (beat: every 60 s)
# A killed Redis consumer's unacknowledged messages come back after this (RabbitMQ:
# at once, when the connection drops).
FAST_RESTORE = {
    "JOBSITE_REDIS_VISIBILITY_TIMEOUT": "3",
    "JOBSITE_REDIS_RESTORE_INTERVAL": "1",
    "JOBSITE_REDIS_RESTORE_THROTTLE": "1",
}


def purge_queue(url: str) -> None:
    with celery_app.connection_for_write(url) as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_purge(QUEUE)


def mails_by_subject(mail_dir: Path) -> collections.Counter:
    sent: collections.Counter = collections.Counter()
    for path in mail_dir.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("Subject: chaos-"):
                sent[line.removeprefix("Subject: ")] += 1
    return sent


def unfinished(ids: list[str]) -> int:
    return Job.objects.filter(pk__in=ids).exclude(state__in=FINISHED_STATES).count()


def wait_until_done(ids: list[str], share: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while unfinished(ids) > len(ids) * (1 - share) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_no_guarded_run_is_lost_when_whole_workers_are_killed_and_restarted(
    broker, _workers, transactional_db, alice, granted
):
    url = BROKERS[broker]
    if not _reachable(url):
        service_unavailable(f"{broker} is not reachable at {url}")
    use_broker(url)
    purge_queue(url)
    rng = random.Random(SEED)
    mail_dir = Path(tempfile.mkdtemp(prefix=f"jobsite-chaos-{broker}-"))
    env = {**FAST_RESTORE, "DJANGO_EMAIL_FILE_PATH": str(mail_dir)}
    workers = [
        Worker(broker, url, _workers.db_url, name=f"chaos-{broker}-{n}", queues=QUEUE,
               concurrency=POOL, extra_env=env)
        for n in (1, 2)
    ]  # fmt: skip
    token = uuid.uuid4().hex[:8]
    started = time.monotonic()
    ids: list[str] = []
    kills = 0
    in_flight: list[int] = []  # unfinished runs of the batch at each kill
    try:
        for worker in workers:
            worker.start()
        # One batch per kill and one more: each kill falls while a batch drains.
        batches = [RUNS // (KILLS + 1)] * (KILLS + 1)
        batches[-1] += RUNS - sum(batches)
        for index, size in enumerate(batches):
            items = [
                (granted["send_mail"],
                 {"to": "ops@example.com", "subject": f"chaos-{token}-{len(ids) + n}", "body": "x"},
                 {"queue": QUEUE})
                for n in range(size)
            ]  # fmt: skip
            batch = [job.id for job in services.job_submit_many(items=items, user=alice)]
            ids += batch
            if index < KILLS:
                # A random moment of the drain: once a random share of the batch is done.
                wait_until_done(batch, share=rng.uniform(0.1, 0.7))
                in_flight.append(unfinished(batch))
                victim = rng.choice(workers)
                victim.kill()  # SIGKILL to its process group: main process and pool
                kills += 1
                victim.start()  # the same name, a new incarnation
                services.jobs_mark_lost()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while unfinished(ids) and time.monotonic() < deadline:
            services.jobs_mark_lost()  # as beat does, more often
            time.sleep(RECONCILE_EVERY)
    finally:
        for worker in workers:
            worker.stop()
        use_broker(BROKERS["redis"])
    elapsed = time.monotonic() - started

    jobs = list(Job.objects.filter(pk__in=ids).values_list("params", "state", "executions"))
    sent = mails_by_subject(mail_dir)
    subjects = [params["subject"] for params, _, _ in jobs]
    lost = [s for s in subjects if sent[s] == 0]
    twice = [s for s in subjects if sent[s] > 1]
    states = collections.Counter(state for _, state, _ in jobs)
    executed_again = sum(1 for _, _, executions in jobs if executions > 1)
    print(
        f"\nchaos {broker}: runs={len(ids)} kills={kills} lost={len(lost)} "
        f"sent twice={len(twice)} executions>1={executed_again} states={dict(states)} "
        f"unfinished at each kill={in_flight} "
        f"time={elapsed:.0f}s seed={SEED}"
    )
    assert len(ids) == RUNS and kills == KILLS
    assert all(in_flight), f"a kill fell on an idle worker: {in_flight}"
    assert states == {"SUCCESS": RUNS}, f"not all final: {dict(states)} (seed {SEED})"
    assert not lost, f"{len(lost)} runs never sent their mail (seed {SEED})"
    assert len(twice) <= kills * POOL, f"{len(twice)} ran twice, over {kills} kills x {POOL}"
