"""Flower beside Jobsite: a plain Flower lists Jobsite's workers and, with -E, its runs.

Flower is started as a user would from a plain install (`celery --broker=<url>
flower`: no Jobsite settings, kombu's defaults), against a Jobsite worker started with
``-E`` (task events on), on Redis and on RabbitMQ.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from jobs import services
from tests.conftest import Worker, wait_for

pytestmark = pytest.mark.broker

QUEUE = "bench"  # a queue noop may use, that no session worker consumes (no events)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Flower:
    def __init__(self, broker_url: str, home) -> None:
        self.base = f"http://127.0.0.1:{free_port()}"
        self.log = home / "flower.log"
        port = self.base.rsplit(":", 1)[1]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-m", "celery", f"--broker={broker_url}", "flower",
                 f"--port={port}", "--address=127.0.0.1"],
                cwd=home, stdout=out, stderr=subprocess.STDOUT,
                env={"PATH": os.environ["PATH"], "HOME": str(home),
                     "FLOWER_UNAUTHENTICATED_API": "true"},
            )  # fmt: skip

    def get(self, path: str):
        with urllib.request.urlopen(self.base + path, timeout=10) as response:  # noqa: S310
            return json.load(response)

    def until(self, path: str, found, timeout: float = 60):
        """GET ``path`` until ``found(reply)`` holds; return that reply."""
        deadline = time.monotonic() + timeout
        reply = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                reply = self.get(path)
            except (urllib.error.URLError, ConnectionError):  # not listening yet
                reply = None
            if reply is not None and found(reply):
                return reply
            time.sleep(0.3)
        raise AssertionError(f"{path} never matched; last reply {reply}\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.fixture
def events_worker(worker, _workers) -> Iterator[Worker]:
    """A Jobsite worker with task events on (-E), on each broker."""
    own = Worker(worker.broker, worker.url, _workers.db_url, name=f"flower-{worker.broker}",
                 queues=QUEUE, args=("-E",))  # fmt: skip
    own.start()
    yield own
    own.stop()


@pytest.fixture
def flower(events_worker, tmp_path) -> Iterator[Flower]:
    flower = Flower(events_worker.url, tmp_path)
    yield flower
    flower.stop()


def test_flower_lists_jobsite_workers_and_shows_their_runs(events_worker, flower, alice, granted):
    name = f"{events_worker.name}@{socket.gethostname()}"
    # Events reach Flower (heartbeats), then remote control answers (inspect).
    flower.until("/api/workers?status=true", lambda alive: alive.get(name) is True)
    workers = flower.until("/api/workers?refresh=true", lambda w: name in w)
    assert QUEUE in [q["name"] for q in workers[name]["active_queues"]]

    run = services.job_submit(job_type=granted["noop"], params={}, user=alice,
                              options={"queue": QUEUE})  # fmt: skip
    assert wait_for(run.id).state == "SUCCESS"

    tasks = flower.until("/api/tasks", lambda t: t.get(run.id, {}).get("state") == "SUCCESS")
    assert tasks[run.id]["name"] == "jobs.noop"
    assert tasks[run.id]["worker"] == name
