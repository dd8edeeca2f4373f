"""`celery -A jobsite <subcommand>`, as a Celery user types it, against a live worker.

Each subcommand runs as a subprocess with the worker's environment (test settings, the
test database, the broker under test) and its output is checked. Not run here, with the
reason: `control shutdown` and `control pool_restart` (they would stop or restart the
shared test worker; both are plain broadcasts, like the `control` commands below) and
`list bindings` on RabbitMQ (kombu reads RabbitMQ's bindings through the management
plugin's HTTP API with the `pyrabbit` package, neither of which Jobsite needs).
"""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import subprocess
import sys
import uuid

import pytest
from django_celery_results.models import TaskResult
from kombu import Connection

from jobs.models import Job
from jobsite.celery import app as celery_app
from tests.conftest import BROKERS, ROOT, _reachable, service_unavailable, wait_for

pytestmark = pytest.mark.broker

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def celery(*argv: str, env: dict, stdin: str | None = None, timeout: float = 60):
    """Run `celery -A jobsite ...`; its output, after checking it exited 0."""
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "jobsite", *argv],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"celery {' '.join(argv)} exited {done.returncode}:\n{output}"
    return output


def node(worker) -> str:
    return f"{worker.name}@{socket.gethostname()}"


def scratch_queue() -> str:
    return f"cli-scratch-{uuid.uuid4().hex[:8]}"


def test_call_sends_a_catalogued_job_and_result_prints_its_result(worker, job_types):
    sent = celery(
        "call", "jobs.count_primes", "--kwargs", json.dumps({"limit": 5000}),
        "--queue", "default", env=worker.env,
    ).strip()  # fmt: skip

    run_id = sent.splitlines()[-1]
    assert UUID.match(run_id), sent
    job = wait_for(run_id)
    assert job.state == "SUCCESS" and job.task_name == "jobs.count_primes"
    result = celery("result", run_id, env=worker.env)
    assert "'primes': 669" in result, result


def test_inspect_commands_answer_from_the_worker(worker):
    target = ["--destination", node(worker)]

    assert "pong" in celery("inspect", "ping", *target, env=worker.env)
    assert "jobs.count_primes" in celery("inspect", "registered", *target, env=worker.env)
    assert "'name': 'default'" in celery("inspect", "active_queues", *target, env=worker.env)
    assert "- empty -" in celery("inspect", "active", *target, env=worker.env)
    for command in ("scheduled", "reserved", "revoked"):
        assert f"{node(worker)}: OK" in celery("inspect", command, *target, env=worker.env)
    stats = json.loads(celery("inspect", "stats", "--json", *target, env=worker.env))
    assert stats[node(worker)]["pool"]["max-concurrency"] == worker.concurrency
    report = celery("inspect", "report", *target, env=worker.env)
    assert "jobs.worker.backend:JobResultBackend" in report


def test_status_counts_the_worker_online(worker):
    output = celery("status", env=worker.env)

    assert f"{node(worker)}: OK" in output
    assert "1 node online." in output


def test_control_commands_reach_the_worker(worker):
    target = ["--destination", node(worker)]
    queue = scratch_queue()

    assert "task events enabled" in celery("control", "enable_events", *target, env=worker.env)
    assert "task events disabled" in celery("control", "disable_events", *target, env=worker.env)
    limited = celery("control", "rate_limit", "jobs.noop", "1000/s", *target, env=worker.env)
    assert "new rate limit set successfully" in limited
    timed = celery("control", "time_limit", "jobs.noop", "60", "70", *target, env=worker.env)
    assert "time limits set successfully" in timed
    added = celery("control", "add_consumer", queue, *target, env=worker.env)
    assert f"add consumer {queue}" in added
    cancelled = celery("control", "cancel_consumer", queue, *target, env=worker.env)
    assert f"no longer consuming from {queue}" in cancelled
    assert "pool will grow" in celery("control", "pool_grow", "1", *target, env=worker.env)
    assert "pool will shrink" in celery("control", "pool_shrink", "1", *target, env=worker.env)
    unknown = str(uuid.uuid4())
    revoked = celery("control", "revoke", unknown, *target, env=worker.env)
    assert "flagged as revoked" in revoked
    terminated = celery("control", "terminate", "TERM", unknown, *target, env=worker.env)
    assert "terminate: tasks unknown" in terminated
    assert f"{node(worker)}: OK" in celery("control", "heartbeat", *target, env=worker.env)


def test_purge_empties_the_queue_it_is_given(worker, job_types):
    queue = scratch_queue()
    for _ in range(2):
        celery("call", "jobs.noop", "--queue", queue, env=worker.env)

    output = celery("purge", "--force", "--queues", queue, env=worker.env)

    assert "Purged 2 messages from 1 known task queue." in output
    again = celery("purge", "--force", "--queues", queue, env=worker.env)
    assert "No messages purged from 1 queue" in again
    _delete_queue(worker.url, queue)


def test_events_dump_shows_the_workers_heartbeats(worker):
    argv = [sys.executable, "-m", "celery", "-A", "jobsite", "events", "--dump"]
    dump = subprocess.Popen(
        argv, cwd=ROOT, env=worker.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    try:
        with selectors.DefaultSelector() as waiting:
            waiting.register(dump.stdout, selectors.EVENT_READ)
            # A worker sends a heartbeat every 2 s: one is due well within the bound.
            while waiting.select(timeout=30):
                line = dump.stdout.readline()
                if not line:
                    break
                seen.append(line)
                if line.startswith(node(worker)) and "heartbeat" in line:
                    break
    finally:
        dump.terminate()
        dump.wait(timeout=20)
    assert any(line.startswith(node(worker)) and "heartbeat" in line for line in seen), seen


def test_shell_runs_python_with_the_app_loaded(worker):
    output = celery(
        "shell",
        "--python",
        env=worker.env,
        stdin="print('tasks:', 'jobs.count_primes' in app.tasks)\n",
    )

    assert "tasks: True" in output


def test_graph_draws_the_bootsteps_and_the_workers(worker):
    assert "digraph" in celery("graph", "bootsteps", env=worker.env)
    assert node(worker) in celery("graph", "workers", env=worker.env)


def test_list_bindings_lists_jobsites_queues(worker):
    if worker.broker == "rabbitmq":
        pytest.skip("kombu lists RabbitMQ bindings through the management plugin (pyrabbit)")

    output = celery("list", "bindings", env=worker.env)

    assert re.search(r"^default\s+default\s+default$", output, re.MULTILINE), output
    assert re.search(r"^reports_all\s+reports\.topic\s+reports\.#$", output, re.MULTILINE)


def test_amqp_declares_and_deletes_a_queue(worker):
    queue = scratch_queue()

    declared = celery("amqp", "queue.declare", queue, env=worker.env)
    assert f"queue:{queue} messages:0 consumers:0" in declared
    deleted = celery("amqp", "queue.delete", queue, env=worker.env)
    assert "OK" in deleted


def test_report_shows_no_secret_of_the_settings(worker):
    secrets = {
        "CELERY_BROKER_URL": "redis://jobs:broker-pw-1@127.0.0.1:6379/9",
        "JOBSITE_REDIS_URL": "redis://:markers-pw-2@127.0.0.1:6379/8?password=query-pw-3",
        "DATABASE_URL": "postgres://jobsite:db-pw-4@127.0.0.1:5432/jobsite",
        "JOBSITE_METRICS_TOKEN": "metrics-token-5",
        "DJANGO_SECRET_KEY": "django-secret-6-" + "x" * 50,
        "DJANGO_EMAIL_HOST_PASSWORD": "mail-pw-7",
    }
    env = {**worker.env, **secrets}
    env.pop("DJANGO_SETTINGS_MODULE")  # the production settings, as an operator runs it
    env["JOBSITE_VAR_DIR"] = str(worker.log.parent / "var")

    output = celery("report", env=env)

    assert "CELERY_BROKER_URL: 'redis://jobs:********@127.0.0.1:6379/9'" in output, output
    assert "JOBSITE_REDIS_URL: 'redis://:********@127.0.0.1:6379/8?password=********'" in output
    hidden = re.findall(r"[a-z]+-(?:pw|token|secret)-\d", " ".join(secrets.values()))
    assert len(hidden) == 7
    assert [part for part in hidden if part in output] == []


def test_inspect_conf_shows_no_broker_password(worker):
    password = BROKERS[worker.broker].partition("@")[0].rpartition(":")[2]

    output = celery("inspect", "conf", "--destination", node(worker), env=worker.env)

    assert "CELERY_BROKER_URL" in output
    if worker.broker == "rabbitmq":  # the Redis of the tests has no password
        assert f":{password}@" not in output
        assert ":********@" in output


def test_migrate_moves_messages_from_rabbitmq_to_redis(transactional_db):
    for name, url in BROKERS.items():
        if not _reachable(url):
            service_unavailable(f"{name} is not reachable at {url}")
    queue = scratch_queue()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    source_env = {**env, "CELERY_BROKER_URL": BROKERS["rabbitmq"]}
    run_id = celery("call", "jobs.noop", "--queue", queue, env=source_env).strip()

    # Until the queue is idle for 2 s; not --limit: Celery's migrate stops at the limit
    # before it acknowledges (and reports) the last message, left on the source too.
    output = celery(
        "migrate", BROKERS["rabbitmq"], BROKERS["redis"], "--queues", queue,
        "--ack-messages", "--timeout", "2", env=env,
    )  # fmt: skip

    assert "Migrating task 1/1: [[], {}, " in output, output
    # migrate connects with kombu's defaults (no transport options): read it the same way.
    assert _depth(BROKERS["redis"], queue) == 1
    assert _depth(BROKERS["rabbitmq"], queue) == 0
    for url in BROKERS.values():
        _delete_queue(url, queue)
    assert not Job.objects.filter(pk=run_id).exists()  # never consumed by a worker
    assert not TaskResult.objects.filter(task_id=run_id).exists()


def _depth(url: str, queue: str) -> int:
    with Connection(url) as conn:
        return conn.default_channel.queue_declare(queue=queue, passive=True).message_count


def _delete_queue(url: str, queue: str) -> None:
    for connection in (Connection(url), celery_app.connection_for_write(url)):
        with connection as conn:
            conn.default_channel.queue_delete(queue)
