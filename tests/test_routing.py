"""Routing over the four exchange types, and per-job-type message options.

Exchange semantics are checked with real messages on dedicated exchanges and queues
(unique names, no consumer), read straight from the broker. Routed job types run on
their own workers, started here, consuming the topic, headers and broadcast queues.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from datetime import datetime

import pytest
from django.core.exceptions import ValidationError
from kombu import Connection, Consumer, Exchange, Producer, Queue

from jobs import routing, services
from jobs.models import Job, JobState
from tests.conftest import BROKERS, Worker, _reachable, service_unavailable, use_broker, wait_for


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request, live_broker):
    with Connection(live_broker(request.param)) as conn:
        yield request.param, conn


@pytest.fixture
def rabbitmq(live_broker):
    with Connection(live_broker("rabbitmq")) as conn:
        yield conn


def unique(name: str) -> str:
    return f"test-{name}-{uuid.uuid4().hex[:8]}"


def declare(conn, *queues: Queue) -> list[Queue]:
    bound = [q(conn.default_channel) for q in queues]
    for q in bound:
        q.declare()
    return bound


def drain(queue: Queue) -> list[str]:
    """Every message waiting in the queue (read and acknowledged), then delete it."""
    bodies = []
    while (message := queue.get(no_ack=True)) is not None:
        bodies.append(message.payload)
    queue.delete()
    return sorted(bodies)


# --- Exchange semantics, with real messages -------------------------------------------


@pytest.mark.broker
def test_a_direct_exchange_delivers_on_an_exact_key_only(broker):
    _, conn = broker
    exchange = Exchange(unique("direct"), type="direct")
    qa, qb = declare(
        conn,
        Queue(unique("a"), exchange, routing_key="reports"),
        Queue(unique("b"), exchange, routing_key="reports.daily"),
    )
    producer = Producer(conn.default_channel, exchange=exchange, serializer="json")

    producer.publish("exact", routing_key="reports")
    producer.publish("other", routing_key="cpu")

    assert drain(qa) == ["exact"]
    assert drain(qb) == []


TOPIC_BINDINGS = {"emea": "reports.*.emea", "all": "reports.#", "weekly": "reports.weekly.*"}
TOPIC_KEYS = ["reports.daily.emea", "reports.weekly.amer", "reports.daily.eu.emea", "cpu.x.emea"]


@pytest.mark.broker
def test_a_topic_exchange_matches_star_and_hash_patterns(broker):
    _, conn = broker
    exchange = Exchange(unique("topic"), type="topic")
    queues = dict(
        zip(
            TOPIC_BINDINGS,
            declare(
                conn,
                *(Queue(unique(n), exchange, routing_key=p) for n, p in TOPIC_BINDINGS.items()),
            ),
            strict=True,
        )
    )  # fmt: skip
    producer = Producer(conn.default_channel, exchange=exchange, serializer="json")

    for key in TOPIC_KEYS:
        producer.publish(key, routing_key=key)

    received = {name: drain(q) for name, q in queues.items()}
    assert received == {
        "emea": ["reports.daily.emea"],  # * is exactly one word
        "all": ["reports.daily.emea", "reports.daily.eu.emea", "reports.weekly.amer"],
        "weekly": ["reports.weekly.amer"],
    }
    # Jobsite's own prediction (shown on runs) agrees with the broker.
    for name, pattern in TOPIC_BINDINGS.items():
        assert sorted(k for k in TOPIC_KEYS if routing.topic_matches(pattern, k)) == received[name]


@pytest.mark.broker
def test_a_fanout_exchange_gives_every_consumer_its_own_copy(broker):
    kind, conn = broker
    exchange = Exchange(unique("fanout"), type="fanout", auto_delete=True)
    got: dict[str, list] = {}
    conns = [Connection(BROKERS[kind]) for _ in range(3)]
    consumers = []
    try:
        for i, c in enumerate(conns):
            queue = Queue(unique(f"worker{i}"), exchange, auto_delete=True)
            got[queue.name] = []
            consumer = Consumer(c.default_channel, [queue], accept=["json"])
            consumer.register_callback(lambda body, message, n=queue.name: got[n].append(body))
            consumer.consume()
            consumers.append(consumer)
            _listen(c)  # Redis fanout is pub/sub: subscribe before anything is published
        # RabbitMQ ignores a fanout's key; kombu's Redis emulation (fanout_patterns)
        # matches it against the binding's, so broadcasts use the empty key.
        Producer(conn.default_channel, exchange=exchange, serializer="json").publish(
            "clear caches", routing_key=""
        )
        for c, name in zip(conns, got, strict=True):
            deadline = time.monotonic() + 10
            while not got[name] and time.monotonic() < deadline:
                _listen(c, 0.5)
    finally:
        for consumer in consumers:
            consumer.cancel()
        for c in conns:
            c.release()
    assert list(got.values()) == [["clear caches"]] * 3


def _listen(conn, timeout: float = 0.2) -> None:
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=timeout)


HEADER_MESSAGES = [
    {"gpu": "yes", "region": "emea"},
    {"gpu": "yes", "region": "amer"},
    {"gpu": "no", "lane": "express"},
    {"gpu": "no", "region": "emea"},
]


@pytest.mark.broker
def test_a_headers_exchange_matches_all_or_any_of_its_binding(rabbitmq):
    exchange = Exchange(unique("headers"), type="headers")
    bindings = {
        "all": {"x-match": "all", "gpu": "yes", "region": "emea"},
        "any": {"x-match": "any", "gpu": "yes", "lane": "express"},
    }
    queues = {
        name: declare(rabbitmq, Queue(unique(name), exchange, binding_arguments=args))[0]
        for name, args in bindings.items()
    }
    producer = Producer(rabbitmq.default_channel, exchange=exchange, serializer="json")

    for headers in HEADER_MESSAGES:
        producer.publish(str(sorted(headers.items())), headers=headers, routing_key="")

    received = {name: drain(q) for name, q in queues.items()}
    label = {str(sorted(h.items())): i for i, h in enumerate(HEADER_MESSAGES)}
    assert {n: sorted(label[b] for b in bodies) for n, bodies in received.items()} == {
        "all": [0],  # both headers needed
        "any": [0, 1, 2],  # one is enough; message 3 matches nothing and is dropped
    }
    for name, args in bindings.items():
        expected = [i for i, h in enumerate(HEADER_MESSAGES) if routing.headers_match(args, h)]
        assert expected == sorted(label[b] for b in received[name])


def test_workers_on_redis_are_not_given_headers_queues():
    names = {q.name for q in routing.queues_for("redis://localhost:6379/0")}
    assert {"default", "reports", "cpu", "reports_emea", "reports_all"} <= names
    assert not names & {"gpu_emea", "accelerated"}
    assert {"gpu_emea", "accelerated"} <= {q.name for q in routing.queues_for("amqp://x//")}
    assert all(q.queue_arguments == {"x-max-priority": 10} for q in routing.QUEUES)


def test_a_headers_routed_job_is_refused_on_redis(alice, granted):
    use_broker(BROKERS["redis"])

    with pytest.raises(ValidationError, match="only RabbitMQ supports"):
        services.job_submit(
            job_type=granted["capability_job"],
            params={"gpu": True, "region": "emea", "lane": "standard"},
            user=alice,
        )
    assert not Job.objects.exists()


def test_a_headers_route_matching_no_queue_is_refused(alice, granted):
    use_broker(BROKERS["rabbitmq"])
    try:
        with pytest.raises(ValidationError, match="would be lost"):
            services.job_submit(
                job_type=granted["capability_job"],
                params={"gpu": False, "region": "amer", "lane": "standard"},
                user=alice,
            )
    finally:
        use_broker(BROKERS["redis"])
    assert not Job.objects.exists()


# --- Routed job types on their own workers ------------------------------------------------


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def _routed(request, _workers):
    url = BROKERS[request.param]
    if not _reachable(url):
        service_unavailable(f"{request.param} is not reachable at {url}")
    queues = ["reports_emea", "reports_all", "broadcast_tasks"]
    if request.param == "rabbitmq":
        queues += ["gpu_emea", "accelerated"]
    workers = [
        Worker(request.param, url, _workers.db_url, name=f"routed{i}-{request.param}",
               queues=",".join(queues), concurrency=1)
        for i in (1, 2)
    ]  # fmt: skip
    for w in workers:
        w.start()
    yield request.param, workers
    for w in workers:
        w.stop()


@pytest.fixture
def routed(_routed, transactional_db):
    kind, workers = _routed
    use_broker(BROKERS[kind])
    yield kind, workers
    use_broker(BROKERS["redis"])


def wait_until(check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.broker
def test_a_topic_routed_job_reaches_every_queue_its_key_matches(routed, alice, granted):
    job = services.job_submit(
        job_type=granted["regional_report"],
        params={"kind": "daily", "region": "emea", "rows": 10},
        user=alice,
    )
    assert job.options["exchange"] == "reports.topic"
    assert job.options["routing_key"] == "reports.daily.emea"
    assert job.options["queues"] == ["reports_emea", "reports_all"]

    job = wait_for(job.pk)

    assert job.state == JobState.SUCCESS
    assert job.result["routing_key"] == "reports.daily.emea"
    # Delivered to both queues; the duplicate guard ran it once and counted the other.
    wait_until(lambda: Job.objects.get(pk=job.pk).duplicates_skipped == 1)


@pytest.mark.broker
def test_a_broadcast_job_runs_once_on_every_worker(routed, alice, granted):
    _, workers = routed
    job = services.job_submit(
        job_type=granted["clear_caches"], params={"reason": "deploy"}, user=alice
    )
    assert job.options["exchange_type"] == "fanout"

    children = wait_until(
        lambda: (
            list(Job.objects.filter(workflow_id=job.pk, state=JobState.SUCCESS))
            if Job.objects.filter(workflow_id=job.pk, state=JobState.SUCCESS).count() == 2
            else None
        )
    )

    hosts = sorted(c.worker.split("@")[0] for c in children)
    assert hosts == sorted(w.name for w in workers)
    assert {c.pk for c in children} == {f"{job.pk}:{c.worker}" for c in children}
    assert all(c.submitted_by == alice and c.result["reason"] == "deploy" for c in children)


@pytest.mark.broker
def test_a_headers_routed_job_runs_on_rabbitmq(routed, alice, granted):
    kind, _ = routed
    if kind != "rabbitmq":
        return  # Redis refuses it at submit: see test_a_headers_routed_job_is_refused_on_redis
    job = services.job_submit(
        job_type=granted["capability_job"],
        params={"gpu": True, "region": "emea", "lane": "standard"},
        user=alice,
    )
    assert job.options["route_headers"] == {"gpu": "yes", "region": "emea", "lane": "standard"}
    assert job.options["queues"] == ["gpu_emea", "accelerated"]

    job = wait_for(job.pk)

    assert job.state == JobState.SUCCESS
    assert job.result["exchange"] == "jobs.headers"


# --- Message options ------------------------------------------------------------------


@pytest.mark.broker
def test_a_high_priority_job_overtakes_queued_low_priority_ones(
    broker, _workers, transactional_db, alice, granted
):
    kind, _ = broker
    use_broker(BROKERS[kind])
    queue = unique("prio")
    count_primes = granted["count_primes"]

    def submit(priority: int, **options) -> Job:
        return services.job_submit(
            job_type=count_primes, params={"limit": 1000}, user=alice,
            options={"queue": queue, "priority": priority, **options},
        )  # fmt: skip

    try:
        expired = submit(9, expires=1)
        low = [submit(1) for _ in range(3)]
        high = submit(9)
        time.sleep(1.2)  # the expiring run is now past its expiry, still in the queue
        worker = Worker(kind, BROKERS[kind], _workers.db_url, name=f"prio-{kind}",
                        queues=queue, concurrency=1)  # fmt: skip
        worker.start()
        try:
            *low, high = [wait_for(j.pk) for j in [*low, high]]
            if kind == "redis":  # the worker discards it and records it as revoked
                assert wait_for(expired.pk).state == JobState.REVOKED
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{worker.output()}") from None
        finally:
            worker.stop()
        if kind == "rabbitmq":  # Celery also sets the message's TTL: the broker drops it
            with Connection(BROKERS[kind]) as conn:
                declared = conn.default_channel.queue_declare(queue, passive=True)
                assert declared.message_count == 0
    finally:
        use_broker(BROKERS["redis"])

    order = sorted([*low, high], key=lambda j: j.started_at)
    assert order[0].pk == high.pk
    assert [j.pk for j in order[1:]] == [j.pk for j in low]
    expired.refresh_from_db()
    assert expired.started_at is None  # expired before a worker could start it


@pytest.mark.broker
def test_a_retried_job_waits_longer_each_time(worker, alice, granted):
    job = services.job_submit(
        job_type=granted["flaky"],
        params={"mode": "retry", "failures": 2, "message": "down"},
        user=alice,
        options={"max_retries": 3},
    )

    job = wait_for(job.pk, timeout=40)

    assert job.state == JobState.SUCCESS
    delays = [
        (
            datetime.fromisoformat(r["next_attempt_at"]) - datetime.fromisoformat(r["at"])
        ).total_seconds()
        for r in job.retry_history
    ]
    # retry_backoff 1 s, doubled each time, with jitter in [delay/2, delay].
    assert 0.3 <= delays[0] <= 1.0
    assert 0.8 <= delays[1] <= 2.0
    assert delays[0] <= delays[1]
    # The attempts really were that far apart: the last one started after both waits.
    first_retry = datetime.fromisoformat(job.retry_history[0]["at"])
    assert (job.started_at - first_retry).total_seconds() >= delays[0] + delays[1] - 0.2


@pytest.mark.broker
def test_a_soft_time_limit_lets_the_job_return_a_partial_result(worker, alice, granted):
    count_primes = granted["count_primes"]
    count_primes.soft_time_limit, count_primes.time_limit = 1, 30
    count_primes.save()

    job = services.job_submit(
        job_type=count_primes, params={"limit": 200_000_000}, user=alice,
        options={"queue": "cpu"},
    )  # fmt: skip

    job = wait_for(job.pk, timeout=40)

    assert job.state == JobState.SUCCESS
    assert job.result["partial"] is True
    assert job.result["primes"] > 0 and job.result["checked_below"] < 200_000_000
    assert job.options["soft_time_limit"] == 1 and job.options["time_limit"] == 30


def test_each_run_shows_its_route_rate_limit_and_limits(
    alice_client, alice, granted, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False):
        job = services.job_submit(
            job_type=granted["mail_summary"],
            params={"to": "a@example.com", "subject": "Hi"},
            user=alice,
            options={"priority": 7},
        )

    assert job.options["rate_limit"] == "60/m"
    assert job.options["exchange_type"] == "direct" and job.options["routing_key"] == "default"
    page = alice_client.get(job.get_absolute_url()).content.decode()
    assert 'id="run-delivery"' in page
    assert "60/m" in page and "(AMQP default exchange)" in page


def test_quorum_queues_carry_a_delivery_limit_and_a_dead_letter_exchange_not_priorities():
    queues = [q for q in routing.queues_for("amqp://x//", "quorum", 3) if q.queue_arguments]

    assert {q.name for q in queues} == set(routing.ALL_QUEUE_NAMES)
    for queue in queues:
        assert queue.queue_arguments["x-queue-type"] == "quorum"
        assert queue.queue_arguments["x-delivery-limit"] == 3
        assert queue.queue_arguments["x-dead-letter-exchange"] == routing.DEAD_LETTER_EXCHANGE
        assert "x-max-priority" not in queue.queue_arguments
    # Native delayed delivery binds through the queue's exchange, and skips direct ones.
    assert {q.exchange.type for q in queues if q.name in routing.QUEUE_NAMES} == {"topic"}
    assert routing.uses_quorum(queues) and not routing.uses_quorum(routing.QUEUES)


@pytest.mark.parametrize("exchange_type", ["headers", "fanout"])
def test_a_countdown_on_a_route_delayed_delivery_cannot_route_back_is_refused(exchange_type):
    with pytest.raises(ValidationError, match="cannot start later on quorum queues"):
        routing.check_delayable({"exchange_type": exchange_type})
    routing.check_delayable({"exchange_type": "topic"})


def test_a_sub_second_delay_is_raised_to_the_second_native_delayed_delivery_needs():
    assert routing.native_delay(0.4) == 1.0
    assert routing.native_delay(2.5) == 2.5
    assert routing.native_delay(0) == 0
    assert routing.native_delay(-3) == -3  # an ETA already past: published at once
