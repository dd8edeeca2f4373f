"""Runs a Redis broker lost before any worker received them are sent again (kombu#305).

kombu's Redis transport pops a message (BRPOP) and only then records it unacknowledged;
a consumer killed in between, or a reply lost in a server restart, loses the message.
The reconciliation (jobs_mark_lost, from beat) looks for sent, never received runs whose
message is neither waiting in its queue nor held unacknowledged, twice, some seconds
apart, and publishes them again.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import redis, services
from jobs.models import Job, JobLog, JobSource
from jobs.selectors.broker import redis_run_ids_on_broker
from jobs.services import maintenance
from jobsite.celery import app as celery_app
from tests.conftest import BROKERS, purge, use_broker

pytestmark = pytest.mark.broker

QUEUE = "default"


@pytest.fixture
def on_redis(live_broker):
    url = live_broker("redis")
    use_broker(url)
    purge(url)
    redis.client().delete(maintenance.VANISHED)
    yield url
    purge(url)
    use_broker(BROKERS["redis"])


def sent_run(granted, alice, *, ago: float = 600, **fields) -> Job:
    values = {
        "state": "PENDING", "queue": QUEUE,
        # As a submit stores them: every routing option, the unused ones empty.
        "options": {"queue": QUEUE, "route": "", "exchange": "", "routing_key": ""},
        "sent_at": timezone.now() - timedelta(seconds=ago),
        "params": {"to": "ops@example.com", "subject": "vanished", "body": "x"}, **fields,
    }  # fmt: skip
    return Job.objects.create(
        id=str(uuid.uuid4()), task_name="jobs.send_mail", submitted_by=alice,
        job_type=granted["send_mail"], **values,
    )  # fmt: skip


def waiting_ids(url: str) -> list[str]:
    with celery_app.connection_for_read(url) as conn:
        client = conn.default_channel.client
        return [json.loads(raw)["headers"]["id"] for raw in client.lrange(QUEUE, 0, -1)]


def two_looks(**kwargs) -> tuple[int, int]:
    first = services.jobs_resend_vanished(**kwargs)
    time.sleep(maintenance.VANISHED_CONFIRM + 0.1)
    return first, services.jobs_resend_vanished(**kwargs)


def test_a_run_gone_from_the_broker_is_sent_again_after_a_second_look(on_redis, granted, alice):
    job = sent_run(granted, alice)

    assert two_looks() == (0, 1)  # the first look only notes it

    assert waiting_ids(on_redis) == [job.id]
    job.refresh_from_db()
    assert job.state == "PENDING" and job.sent_at > timezone.now() - timedelta(seconds=10)
    log = JobLog.objects.get(job=job)
    assert log.logger == "jobsite.relay" and "lost this run's message" in log.message
    # Now it waits in its queue: never sent a third time.
    assert two_looks() == (0, 0)


def test_reconciliation_from_beat_sends_it_again(on_redis, granted, alice):
    job = sent_run(granted, alice)
    services.jobs_mark_lost()
    time.sleep(maintenance.VANISHED_CONFIRM + 0.1)

    assert services.jobs_mark_lost() == 1
    assert waiting_ids(on_redis) == [job.id]


def test_a_run_waiting_in_its_queue_is_left_alone(on_redis, granted, alice):
    job = sent_run(granted, alice)
    job.sent_at = None
    assert services.job_publish(job=job)
    Job.objects.filter(pk=job.pk).update(sent_at=timezone.now() - timedelta(seconds=600))

    assert two_looks() == (0, 0)
    assert waiting_ids(on_redis) == [job.id]


def test_a_run_held_unacknowledged_by_a_worker_is_left_alone(on_redis, granted, alice):
    job = sent_run(granted, alice)
    message = {"body": "", "headers": {"id": job.id, "task": job.task_name},
               "properties": {"correlation_id": job.id, "delivery_tag": "t1"}}  # fmt: skip
    with celery_app.connection_for_write(on_redis) as conn:
        conn.default_channel.client.hset("unacked", "t1", json.dumps([message, "", QUEUE]))
    try:
        assert two_looks() == (0, 0)
    finally:
        with celery_app.connection_for_write(on_redis) as conn:
            conn.default_channel.client.hdel("unacked", "t1")


@pytest.mark.parametrize(
    "fields",
    [
        {"received_at": timezone.now()},  # a worker has it
        {"state": "SUCCESS"},
        {"source": JobSource.WORKFLOW},  # its canvas is sent as a whole
        {"options": {"route": "fanout"}},  # a fanout message never waits in a list
        {"options": {"exchange": "reports"}},
        {"queue": ""},
    ],
    ids=["received", "finished", "workflow-step", "routed", "exchange", "no-queue"],
)
def test_runs_it_cannot_judge_or_need_not_send_are_left_alone(on_redis, granted, alice, fields):
    sent_run(granted, alice, **fields)

    assert two_looks() == (0, 0)
    assert waiting_ids(on_redis) == []


def test_a_run_sent_recently_is_left_to_the_broker(on_redis, granted, alice, settings):
    settings.JOBSITE_REDIS_RESEND_AFTER = 120
    sent_run(granted, alice, ago=30)

    assert two_looks() == (0, 0)


def test_a_backlog_too_long_to_read_concludes_nothing(on_redis, granted, alice):
    waiting = []
    for _ in range(3):
        job = sent_run(granted, alice)
        job.sent_at = None
        assert services.job_publish(job=job)
        waiting.append(job.id)

    assert redis_run_ids_on_broker({QUEUE}, limit=10) == set(waiting)
    assert redis_run_ids_on_broker({QUEUE}, limit=2) is None  # not "none of them is there"


def test_on_rabbitmq_nothing_is_sent_again(live_broker, granted, alice):
    url = live_broker("rabbitmq")
    use_broker(url)
    try:
        sent_run(granted, alice)
        assert two_looks() == (0, 0)
    finally:
        use_broker(BROKERS["redis"])
