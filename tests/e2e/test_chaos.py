"""Chaos: whole workers SIGKILLed at random moments and restarted under their names.

On each broker, two prefork workers (2 processes each) drain guarded e-mail runs
(send_mail; its side effect, a file per message, is written outside the database)
while a supervisor loop kills a whole worker (main process and pool: its process
group) mid-drain and starts it again under the same name, as systemd or Kubernetes
would. Reconciliation runs as beat would run it (jobs_mark_lost), only more often.

Two more scenarios restart a real server mid-drain instead of killing workers: the broker
(a private redis-server, append-only, or a private RabbitMQ node), and PostgreSQL (a
private cluster that the test's database is copied onto), stopped cleanly, down for a
moment, and started again. The machine's shared servers are never restarted.

Asserted: every run reaches its final state, none is lost (each mail sent at least
once), and, for kills, the runs that ran twice are at most kills x pool size. The
figures are printed (run with -s to see them). On Redis, a run sent and then gone from
the broker before any worker received it (kombu's transport pops a message before it
stores it as unacknowledged, kombu#305) is sent again by the reconciliation
(jobs_resend_vanished); the figures count those as "resent". One still unsent when the
drain ends makes the test xfail, named; any other lost or unfinished run fails it.

Fast by default (CI): CHAOS_RUNS=300, CHAOS_KILLS=3, CHAOS_RESTARTS=2, well under 2
minutes per scenario. The long run:
    CHAOS_RUNS=3000 CHAOS_KILLS=6 python -m pytest -s tests/e2e/test_chaos.py
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.db import connection
from django.test import override_settings
from kombu.utils.encoding import bytes_to_str

from jobs import services
from jobs.models import FINISHED_STATES, Job, JobLog
from jobs.redis import client as redis_client
from jobs.selectors.broker import redis_run_ids_on_broker
from jobs.services.maintenance import VANISHED
from jobsite.celery import app as celery_app
from tests.conftest import BROKERS, Worker, _reachable, service_unavailable, use_broker
from tests.e2e.servers import PrivatePostgres, PrivateRabbitMQ, PrivateRedis, PrivateServer

pytestmark = [pytest.mark.broker, pytest.mark.chaos]

RUNS = int(os.environ.get("CHAOS_RUNS", "300"))
KILLS = int(os.environ.get("CHAOS_KILLS", "3"))
RESTARTS = int(os.environ.get("CHAOS_RESTARTS", "2"))  # of the broker
SEED = int(os.environ.get("CHAOS_SEED", str(random.randrange(1_000_000))))
POOL = 2
QUEUE = "chaosq"
DRAIN_TIMEOUT = 30 + RUNS / 20  # seconds after the last fault (a drain takes a few)
RECONCILE_EVERY = 2.0  # seconds (beat: every 60 s)
# pyproject's 300 s suits the fast variant; the long one needs more.
pytestmark.append(pytest.mark.timeout(int(240 + RUNS * 0.4)))
# A killed Redis consumer's unacknowledged messages come back after this (RabbitMQ:
# at once, when the connection drops).
FAST_RESTORE = {
    "JOBSITE_REDIS_VISIBILITY_TIMEOUT": "3",
    "JOBSITE_REDIS_RESTORE_INTERVAL": "1",
    "JOBSITE_REDIS_RESTORE_THROTTLE": "1",
    "JOBSITE_REDIS_RESTORE_MUTEX_EXPIRE": "2",
}
RESEND_AFTER = 5  # seconds: a run the Redis broker lost is sent again (beat: 120 s)


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


@dataclass
class Drain:
    """Guarded mail runs drained by two workers while ``fault`` strikes between batches."""

    broker: str
    url: str
    db_url: str
    faults: int
    rng: random.Random = field(default_factory=lambda: random.Random(SEED))
    dead_logs: list[str] = field(default_factory=list)  # of the incarnations killed

    def run(self, alice, granted, fault) -> dict:
        mail_dir = Path(tempfile.mkdtemp(prefix=f"jobsite-chaos-{self.broker}-"))
        env = {**FAST_RESTORE, "DJANGO_EMAIL_FILE_PATH": str(mail_dir)}
        self.workers = [
            Worker(self.broker, self.url, self.db_url, name=f"chaos-{self.broker}-{n}",
                   queues=QUEUE, concurrency=POOL, extra_env=env)
            for n in (1, 2)
        ]  # fmt: skip
        use_broker(self.url)
        purge_queue(self.url)
        token = uuid.uuid4().hex[:8]
        started = time.monotonic()
        ids: list[str] = []
        in_flight: list[int] = []  # unfinished runs of the batch at each fault
        try:
            for worker in self.workers:
                worker.start()
            # One batch per fault and one more: each fault falls while a batch drains.
            batches = [RUNS // (self.faults + 1)] * (self.faults + 1)
            batches[-1] += RUNS - sum(batches)
            for index, size in enumerate(batches):
                items = [
                    (granted["send_mail"],
                     {"to": "ops@example.com", "subject": f"chaos-{token}-{len(ids) + n}",
                      "body": "x"},
                     {"queue": QUEUE})
                    for n in range(size)
                ]  # fmt: skip
                batch = [job.id for job in services.job_submit_many(items=items, user=alice)]
                ids += batch
                if index < self.faults:
                    # A random moment of the drain: once a random share of it is done.
                    wait_until_done(batch, share=self.rng.uniform(0.1, 0.7))
                    in_flight.append(unfinished(batch))
                    fault(self)
                    services.jobs_mark_lost()
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while unfinished(ids) and time.monotonic() < deadline:
                # As beat does, more often: reconcile, and send what the broker refused.
                with override_settings(JOBSITE_REDIS_RESEND_AFTER=RESEND_AFTER):
                    services.jobs_mark_lost()
                services.jobs_relay(min_age=0)
                time.sleep(RECONCILE_EVERY)
            stuck = list(
                Job.objects.filter(pk__in=ids)
                .exclude(state__in=FINISHED_STATES)
                .values_list("pk", "state", "sent_at", "received_at", "worker")
            )
            diagnosis = self.diagnose([row[0] for row in stuck]) if stuck else ""
        finally:
            for worker in self.workers:
                worker.stop()
            use_broker(BROKERS["redis"])
        rows = list(Job.objects.filter(pk__in=ids).values_list("params", "state", "executions"))
        sent = mails_by_subject(mail_dir)
        subjects = [params["subject"] for params, _, _ in rows]
        return {
            "runs": len(ids),
            "lost": [s for s in subjects if sent[s] == 0],
            "twice": [s for s in subjects if sent[s] > 1],
            "states": dict(collections.Counter(state for _, state, _ in rows)),
            "executed_again": sum(1 for _, _, executions in rows if executions > 1),
            # Lost by the Redis transport before any worker received them (kombu#305).
            "resent": JobLog.objects.filter(job_id__in=ids, logger="jobsite.relay").count(),
            "in_flight": in_flight,
            "stuck": stuck,
            "diagnosis": diagnosis,
            "time": time.monotonic() - started,
        }

    def diagnose(self, ids: list[str]) -> str:
        """What the broker, the reconciliation and every worker's log say of ``ids``."""
        on_broker = redis_run_ids_on_broker({QUEUE}) if self.broker == "redis" else None
        vanished = {bytes_to_str(k): v for k, v in redis_client().hgetall(VANISHED).items()}
        logs = [*self.dead_logs, *(w.log.read_text(errors="replace") for w in self.workers)]
        lines = []
        for pk in ids[:5]:
            run_log = list(JobLog.objects.filter(job_id=pk).values_list("message", flat=True))
            lines.append(
                f"{pk}: on the broker={None if on_broker is None else pk in on_broker} "
                f"first seen gone={vanished.get(pk)} "
                f"run log={run_log}"
            )
            lines += [f"  {line}" for log in logs for line in log.splitlines() if pk in line]
        return "\n".join(lines)


def report(scenario: str, faults: int, figures: dict) -> None:
    print(
        f"\nchaos {scenario}: runs={figures['runs']} faults={faults} "
        f"lost={len(figures['lost'])} sent twice={len(figures['twice'])} "
        f"executions>1={figures['executed_again']} resent={figures['resent']} "
        f"states={figures['states']} "
        f"unfinished at each fault={figures['in_flight']} time={figures['time']:.0f}s "
        f"seed={SEED}"
    )
    if figures["diagnosis"]:
        print(figures["diagnosis"])
    assert figures["runs"] == RUNS
    assert all(figures["in_flight"]), f"a fault fell on idle workers: {figures['in_flight']}"
    never_delivered = [row for row in figures["stuck"] if row[1] == "PENDING" and not row[3]]
    if scenario.startswith("redis") and never_delivered == figures["stuck"] != []:
        # Sent, gone from the broker before any worker recorded it (kombu#305), and not
        # yet sent again by jobs_resend_vanished when the drain timed out: seen once in
        # nine runs of the suite on a loaded machine. Named, so it can be followed up.
        pytest.xfail(
            f"{len(never_delivered)} runs lost by the Redis transport: {never_delivered}\n"
            f"{figures['diagnosis']}"
        )
    assert figures["states"] == {"SUCCESS": RUNS}, (
        f"not all final (seed {SEED}): {figures['stuck']}\n{figures['diagnosis']}"
    )
    assert not figures["lost"], f"{len(figures['lost'])} runs never sent their mail"


def shared_broker(broker: str) -> str:
    url = BROKERS[broker]
    if not _reachable(url):
        service_unavailable(f"{broker} is not reachable at {url}")
    return url


def kill_a_worker(drain: Drain) -> None:
    victim = drain.rng.choice(drain.workers)
    victim.kill()  # SIGKILL to its process group: main process and pool
    drain.dead_logs.append(victim.log.read_text(errors="replace"))
    victim.start()  # the same name, a new incarnation


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_no_guarded_run_is_lost_when_whole_workers_are_killed_and_restarted(
    broker, _workers, transactional_db, alice, granted
):
    url = shared_broker(broker)
    figures = Drain(broker, url, _workers.db_url, KILLS).run(alice, granted, kill_a_worker)

    report(f"{broker} kills", KILLS, figures)
    assert len(figures["twice"]) <= KILLS * POOL, "more ran twice than kills x pool size"


def restart_the_server(server: PrivateServer, down: float = 1.0):
    """A fault that stops ``server`` cleanly, leaves it down ``down`` seconds, starts it."""

    def fault(drain: Drain) -> None:
        server.stop()
        time.sleep(down)
        server.start()

    return fault


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_no_guarded_run_is_lost_when_the_broker_restarts_mid_drain(
    broker, _workers, transactional_db, alice, granted
):
    server: PrivateServer = PrivateRedis() if broker == "redis" else PrivateRabbitMQ()
    if not server.available():
        service_unavailable(f"no {server.what} binary to start a private broker")
    try:
        server.start()
        figures = Drain(broker, server.url, _workers.db_url, RESTARTS).run(
            alice, granted, restart_the_server(server)
        )
    finally:
        server.remove()

    report(f"{broker} broker restarts", RESTARTS, figures)


@contextlib.contextmanager
def database_on(server: PrivatePostgres):
    """Move this test's database, with what its fixtures wrote, onto ``server``.

    The test's own connection (submits, reconciliation, the checks) and the workers then
    use the private PostgreSQL, which the test may restart; the shared one is never
    restarted. Back on the shared database afterwards, for the test's own teardown.
    """
    shared = connection.settings_dict
    dump = subprocess.run(
        ["pg_dump", "--no-owner", "-h", shared["HOST"], "-p", str(shared["PORT"] or 5432),
         "-U", shared["USER"], shared["NAME"]],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    subprocess.run(
        ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(server.port),
         "-U", "postgres", "jobsite"],
        input=dump, check=True, capture_output=True,
    )  # fmt: skip
    saved = {key: shared[key] for key in ("HOST", "PORT", "NAME", "USER")}
    connection.close()
    shared.update(HOST="127.0.0.1", PORT=str(server.port), NAME="jobsite", USER="postgres")
    try:
        yield server.url
    finally:
        connection.close()
        shared.update(saved)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_no_guarded_run_is_lost_when_postgresql_restarts_mid_drain(
    broker, _workers, transactional_db, alice, granted
):
    url = shared_broker(broker)
    server = PrivatePostgres()
    if not server.available():
        service_unavailable("no PostgreSQL binaries to start a private database")
    restart = restart_the_server(server, down=2.0)

    def restart_the_database(drain: Drain) -> None:
        restart(drain)
        connection.close()  # the test's own session ended with the server; a new one

    try:
        server.start()
        with database_on(server) as db_url:
            figures = Drain(broker, url, db_url, RESTARTS).run(alice, granted, restart_the_database)
    finally:
        server.remove()

    report(f"{broker} postgresql restarts", RESTARTS, figures)
