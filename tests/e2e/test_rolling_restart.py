"""A rolling restart: every worker restarted one by one (SIGTERM) while runs drain.

On each broker, two prefork workers drain guarded (acks_late) e-mail runs, whose side
effect, a file per message, is written outside the database (tests/e2e/test_chaos.py's
Drain). Mid-drain, each worker in turn gets SIGTERM, Celery's warm shutdown (it takes no
new message and finishes the runs it holds, with Celery 5.5's soft shutdown given
JOBSITE_SOFT_SHUTDOWN_TIMEOUT seconds more), and is started again under its name before
the next one goes, as `docker compose up` with a new image or a Kubernetes rollout does.

Asserted: every run reaches SUCCESS and none is lost (each mail sent at least once).
ROLLING_RUNS (default 200) and ROLLING_ROUNDS (default 1: one restart of every worker).
"""

from __future__ import annotations

import os

import pytest

from tests.e2e import test_chaos
from tests.e2e.test_chaos import Drain, report, shared_broker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

RUNS = int(os.environ.get("ROLLING_RUNS", "200"))
ROUNDS = int(os.environ.get("ROLLING_ROUNDS", "1"))


def restart_every_worker_in_turn(drain: Drain) -> None:
    for worker in drain.workers:
        worker.stop()  # SIGTERM to the main process: warm shutdown
        worker.start()  # back under its name before the next one goes


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_no_run_is_lost_when_every_worker_is_restarted_one_by_one(
    broker, _workers, transactional_db, alice, granted, monkeypatch
):
    monkeypatch.setattr("tests.e2e.test_chaos.RUNS", RUNS)
    monkeypatch.setattr(
        "tests.e2e.test_chaos.FAST_RESTORE",
        {**test_chaos.FAST_RESTORE, "JOBSITE_SOFT_SHUTDOWN_TIMEOUT": "5"},
    )
    url = shared_broker(broker)
    figures = Drain(broker, url, _workers.db_url, ROUNDS).run(
        alice, granted, restart_every_worker_in_turn
    )

    report(f"{broker} rolling restarts", ROUNDS, figures)
