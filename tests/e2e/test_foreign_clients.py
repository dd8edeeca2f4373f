"""Producers Jobsite did not write put catalogued tasks on its broker; they run and show.

A plain Celery app that knows nothing but the broker URL (another service's
producer), and a client in another language (celery-node from npm; on RabbitMQ a
hand-built protocol-2 message from Node's amqplib, see foreign_client.js), on Redis
and on RabbitMQ, with and without a priority.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from django.urls import reverse

from jobs.models import JobSource
from tests.conftest import service_unavailable, wait_for

pytestmark = pytest.mark.broker

KWARGS = {"limit": 5000}
RESULT = {"limit": 5000, "primes": 669}
NODE_PACKAGES = ("celery-node@0.5.9", "amqplib@0.8.0")
NODE_CLIENT = Path(__file__).with_name("foreign_client.js")

# Only the broker URL: no Jobsite settings, no routes, no queues declared. It addresses
# Jobsite's queue through the exchange that routes to it: on RabbitMQ, a client that
# declares the queue itself (`queue="cpu"`) would be refused for leaving out Jobsite's
# x-max-priority argument.
PLAIN_CLIENT = textwrap.dedent(
    """
    import json, sys
    from celery import Celery

    url, name, kwargs, options = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    app = Celery(broker=url)
    result = app.send_task(name, kwargs=json.loads(kwargs), exchange="default",
                           routing_key="cpu", **json.loads(options))
    print(result.id)
    """
)


def clean_env(home: Path) -> dict[str, str]:
    """Nothing of Jobsite's: no DJANGO_SETTINGS_MODULE, no CELERY_* variables."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}


def plain_celery_send(url: str, tmp_path: Path, **options) -> str:
    script = tmp_path / "producer.py"
    script.write_text(PLAIN_CLIENT)
    done = subprocess.run(
        [sys.executable, "-I", str(script), url, "jobs.count_primes", json.dumps(KWARGS),
         json.dumps(options)],
        cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def assert_in_history(job_id: str, client, admin_user) -> None:
    job = wait_for(job_id)
    assert (job.state, job.result) == ("SUCCESS", RESULT), job.error_message
    assert job.task_name == "jobs.count_primes"
    assert job.job_type is not None and job.job_type.name == "count_primes"
    assert job.source == JobSource.EXTERNAL
    client.force_login(admin_user)
    page = client.get(reverse("jobs-history")).content.decode()
    assert job.get_absolute_url() in page


@pytest.mark.parametrize("options", [{}, {"priority": 9}], ids=["no-priority", "priority-9"])
def test_a_plain_celery_client_runs_a_catalogued_task(
    worker, job_types, tmp_path, client, admin_user, options
):
    job_id = plain_celery_send(worker.url, tmp_path, **options)

    assert_in_history(job_id, client, admin_user)


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """celery-node and amqplib from npm, installed once into a cache directory."""
    if not (shutil.which("node") and shutil.which("npm")):
        service_unavailable("node and npm are needed for the foreign-language client")
    cache = Path(tempfile.gettempdir()) / ("jobsite-node-" + "-".join(NODE_PACKAGES))
    if not (cache / "node_modules" / "celery-node").is_dir():
        staging = Path(tempfile.mkdtemp(prefix="jobsite-node-"))
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix",
             str(staging), *NODE_PACKAGES],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        # Another run may have filled the cache meanwhile: then keep its copy.
        if not (cache / "node_modules").is_dir():
            staging.replace(cache)
    return cache / "node_modules"


def test_a_node_client_runs_a_catalogued_task(
    worker, job_types, node_modules, tmp_path, client, admin_user
):
    mode = "amqp" if worker.broker == "rabbitmq" else "celery-node"
    done = subprocess.run(
        ["node", str(NODE_CLIENT), mode, worker.url, "cpu", "jobs.count_primes",
         json.dumps(KWARGS)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**clean_env(tmp_path), "NODE_PATH": str(node_modules)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    assert_in_history(done.stdout.strip(), client, admin_user)
