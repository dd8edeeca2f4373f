"""`manage.py migrate_redis_queues` and the worker's start: from the old key layout.

0.3.1 and before kept Redis priority lists as ``queue:N`` and bindings as
``rk:pattern:queue``; kombu's default layout uses ``"\\x06\\x16"`` (jobs/services/
redis_queues.py). Nothing that waited under the old names may be lost on upgrade.
"""

from __future__ import annotations

import io
import uuid

import pytest
import redis
from django.core.management import call_command

from jobs.models import JobSource
from jobsite.celery import app as celery_app
from tests.conftest import BROKERS, Worker, _reachable, service_unavailable, use_broker, wait_for

pytestmark = pytest.mark.broker

SEP = "\x06\x16"
QUEUE = "reports_emea"  # a configured queue the tests' workers do not consume
BINDING = "_kombu.binding.migration_test"
PERMANENT = "_kombu.binding_permanent.migration_test"  # kombu 5.7+: the same members


@pytest.fixture
def broker() -> redis.Redis:
    url = BROKERS["redis"]
    if not _reachable(url):
        service_unavailable(f"redis is not reachable at {url}")
    use_broker(url)
    client = redis.Redis.from_url(url, decode_responses=True)
    keys = [BINDING, PERMANENT, *(f"{QUEUE}{sep}{n}" for sep in (":", SEP) for n in range(1, 10))]
    client.delete(*keys)
    yield client
    client.delete(*keys)


def migrate(*args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    call_command("migrate_redis_queues", *args, stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


def popped(client: redis.Redis, key: str) -> list[str]:
    """In the order kombu's workers take them (BRPOP: from the right)."""
    return list(reversed(client.lrange(key, 0, -1)))


def test_old_messages_move_to_the_new_keys_oldest_first_and_ahead_of_newer_ones(broker):
    broker.lpush(f"{QUEUE}:3", "old-1", "old-2")  # old-1 was sent first
    broker.lpush(f"{QUEUE}:9", "old-9")
    broker.lpush(f"{QUEUE}{SEP}3", "new-1")  # sent by an upgraded producer meanwhile

    out = migrate()

    assert popped(broker, f"{QUEUE}{SEP}3") == ["old-1", "old-2", "new-1"]
    assert popped(broker, f"{QUEUE}{SEP}9") == ["old-9"]
    assert not broker.exists(f"{QUEUE}:3", f"{QUEUE}:9")
    assert f"Moved 2 message(s): '{QUEUE}:3' -> '{QUEUE}\\x06\\x163'" in out
    assert "Moved 3 message(s)" in out


def test_old_bindings_are_rewritten_and_unreadable_ones_dropped(broker):
    broker.sadd(BINDING, "rk:pattern:queue", f"rk{SEP}{SEP}kept", "a:b:c:d")
    broker.sadd(PERMANENT, "rk:pattern:queue")

    out = migrate()

    assert broker.smembers(BINDING) == {f"rk{SEP}pattern{SEP}queue", f"rk{SEP}{SEP}kept"}
    assert broker.smembers(PERMANENT) == {f"rk{SEP}pattern{SEP}queue"}
    assert f"Unreadable binding dropped: {BINDING}: 'a:b:c:d'" in out


def test_running_it_again_moves_nothing(broker):
    broker.lpush(f"{QUEUE}:5", "old")
    broker.sadd(BINDING, "rk:pattern:queue")
    migrate()

    out = migrate()

    assert "Moved 0 message(s) and 0 binding(s)" in out
    assert popped(broker, f"{QUEUE}{SEP}5") == ["old"]


def test_a_dry_run_changes_nothing(broker):
    broker.lpush(f"{QUEUE}:5", "old")
    broker.sadd(BINDING, "rk:pattern:queue")

    out = migrate("--dry-run")

    assert f"Would move 1 message(s): '{QUEUE}:5'" in out
    assert "Would move 1 message(s) and 1 binding(s)" in out
    assert broker.lrange(f"{QUEUE}:5", 0, -1) == ["old"]
    assert broker.smembers(BINDING) == {"rk:pattern:queue"}
    assert not broker.exists(f"{QUEUE}{SEP}5")


def test_a_key_that_is_not_a_list_is_left_alone(broker):
    broker.set(f"{QUEUE}:4", "not a queue")

    out = migrate()

    assert f"Left alone: '{QUEUE}:4' is a string, not a queue" in out
    assert broker.get(f"{QUEUE}:4") == "not a queue"


def test_on_rabbitmq_there_is_nothing_to_move():
    url = BROKERS["rabbitmq"]
    if not _reachable(url):
        service_unavailable(f"rabbitmq is not reachable at {url}")
    use_broker(url)
    try:
        assert migrate() == "The broker is amqp: it has no Redis keys to move.\n"
    finally:
        use_broker(BROKERS["redis"])


@pytest.mark.broker
def test_a_worker_starting_after_the_upgrade_runs_what_waited_under_the_old_keys(
    broker, _workers, transactional_db, job_types
):
    queue = f"upgrade-{uuid.uuid4().hex[:8]}"
    run = celery_app.send_task("jobs.count_primes", kwargs={"limit": 5000}, queue=queue, priority=5)
    # What an 0.3.1 producer left behind: its message and binding under ":" names.
    broker.rename(f"{queue}{SEP}5", f"{queue}:5")
    tables = (f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    for table in tables:
        for member in broker.smembers(table):
            broker.srem(table, member)
            broker.sadd(table, member.replace(SEP, ":"))
    worker = Worker("redis", BROKERS["redis"], _workers.db_url, name="test-upgrade", queues=queue)
    worker.start()
    try:
        job = wait_for(run.id)
    finally:
        worker.stop()
        broker.delete(*tables, f"{queue}:5", queue)

    assert (job.state, job.result) == ("SUCCESS", {"limit": 5000, "primes": 669})
    assert job.source == JobSource.EXTERNAL
    assert "Moved 1 message(s) and 2 binding(s) from the old Redis key layout" in worker.output()
