"""kombu 5.7.0 internals: Redis ack emulation (group commit's pipelined acks, the ack
after a reconnect), virtual channels, topic matching, queue depths, transport options."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import redis
from django.conf import settings
from kombu import Connection, Exchange, Message, Queue
from kombu.asynchronous import Hub
from kombu.common import QoS
from kombu.messaging import Producer
from kombu.transport import pyamqp
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Channel as VirtualChannel
from kombu.transport.virtual.base import queue_declare_ok_t
from kombu.transport.virtual.exchange import TopicExchange

from jobs.routing import topic_matches
from jobs.selectors.broker import _run_id
from jobs.worker import commit

from .conftest import parameters


def redis_qos(pipe=None) -> kombu_redis.QoS:
    """kombu's Redis QoS on a channel of its own shape: no server is ever asked."""
    client = redis.Redis()  # lazy: connects only when a command is executed
    channel = SimpleNamespace(
        unacked_key="unacked",
        unacked_index_key="unacked_index",
        do_restore=False,
        conn_or_acquire=lambda client_=None: _yielding(client_ or client),
    )
    qos = kombu_redis.QoS(channel)
    qos._on_collect.cancel()  # no restore at garbage collection
    return qos


class _yielding:
    def __init__(self, value) -> None:
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc) -> None:
        return None


# --- Redis ack emulation (commit.redis_acks_pipelined, consumer._ack_on_current_connection)


def test_remove_from_indices_queues_the_ack_on_the_pipeline_it_is_given():
    qos = redis_qos()
    pipe = redis.Redis().pipeline()

    returned = qos._remove_from_indices("tag-1", pipe)

    assert returned is pipe
    assert [args for args, _ in pipe.command_stack] == [
        ("ZREM", "unacked_index", "tag-1"),
        ("HDEL", "unacked", "tag-1"),
    ]


def test_remove_from_indices_without_a_pipe_returns_one_to_execute():
    qos = redis_qos()

    returned = qos._remove_from_indices("tag-1")

    assert isinstance(returned, redis.client.Pipeline)  # _ack_on_current_connection .execute()s it
    assert len(returned.command_stack) == 2
    assert parameters(kombu_redis.QoS._remove_from_indices) == ["self", "delivery_tag", "pipe"]


def test_ack_removes_the_tag_through_the_instance_attribute_and_executes_its_result():
    """redis_acks_pipelined replaces qos._remove_from_indices on the instance."""
    qos = redis_qos()
    executed = []
    qos._remove_from_indices = lambda tag, pipe=None: SimpleNamespace(
        execute=lambda: executed.append(tag)
    )

    qos.ack("tag-1")

    assert executed == ["tag-1"]
    assert "tag-1" in qos._dirty  # the virtual QoS's bookkeeping still ran (flushed later)
    del qos._remove_from_indices
    assert qos._remove_from_indices.__func__ is kombu_redis.QoS._remove_from_indices


def test_pipe_or_acquire_yields_a_pipeline_of_the_channels_client():
    qos = redis_qos()

    with qos.pipe_or_acquire() as pipe:
        assert isinstance(pipe, redis.client.Pipeline)
    given = redis.Redis().pipeline()
    with qos.pipe_or_acquire(given) as pipe:
        assert pipe is given


def test_redis_acks_pipelined_sends_a_batch_of_acks_in_one_pipeline(monkeypatch):
    """The whole override on kombu's QoS: acks queue on one pipeline, executed on leaving."""
    executed = []
    monkeypatch.setattr(
        redis.client.Pipeline, "execute", lambda self: executed.append(list(self.command_stack))
    )
    qos = redis_qos()
    channel = SimpleNamespace(_qos=qos, closed=False, connection=object())

    with commit.redis_acks_pipelined(channel):
        qos.ack("tag-1")
        qos.ack("tag-2")
        assert executed == []

    assert len(executed) == 1 and len(executed[0]) == 4  # ZREM+HDEL per tag
    assert "_remove_from_indices" not in vars(qos)  # back to the class's own
    assert qos._dirty == {"tag-1", "tag-2"}


# --- The consumer's prefetch window and event loop (commit.GroupCommit) ------------------------


def test_the_prefetch_window_widens_and_narrows_eventually():
    sent = []
    qos = QoS(lambda prefetch_count: sent.append(prefetch_count), 4)

    qos.increment_eventually(8)
    qos.decrement_eventually(6)
    qos.update()

    assert qos.value == 6
    assert sent == [6]
    assert parameters(QoS.increment_eventually) == ["self", "n"]
    assert parameters(QoS.decrement_eventually) == ["self", "n"]


def test_the_event_loop_schedules_callbacks_as_group_commit_calls_it():
    hub = Hub()
    ran = []

    hub.call_soon(ran.append, "soon")
    entry = hub.call_later(60.0, ran.append, "later")
    for callback in hub._pop_ready():
        callback()

    assert ran == ["soon"]
    entry.cancel()
    hub.close()
    assert parameters(Hub.call_later)[:3] == ["self", "delay", "callback"]


# --- Virtual channels -------------------------------------------------------------------


def test_a_virtual_channel_keeps_its_qos_in__qos_and_closes_its_connection_link():
    connection = Connection("memory://")
    channel = connection.channel()

    assert isinstance(channel, VirtualChannel)
    assert channel._qos is None
    assert channel.qos is channel._qos  # created on first use
    channel.close()
    assert channel.closed and channel.connection is None  # what redis_acks_pipelined checks
    connection.release()


def test_message_ack_log_error_takes_a_logger_and_the_errors_to_swallow():
    assert parameters(Message.ack_log_error) == ["self", "logger", "errors", "multiple"]
    assert parameters(Message.reject_log_error) == ["self", "logger", "errors", "requeue"]


# --- Topic matching (jobs.routing.topic_matches) -----------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("reports.*.eu", "reports.sales.eu", True),
        ("reports.*.eu", "reports.sales.us", False),
        ("reports.#", "reports.sales.eu.north", True),
        ("reports.*", "reports.sales.eu", False),
        ("#", "anything.at.all", True),
    ],
)
def test_kombus_topic_matcher_has_amqp_semantics(pattern, key, matches):
    matcher = TopicExchange(None)

    assert bool(matcher._match(matcher.key_to_pattern(pattern), key)) is matches
    assert topic_matches(pattern, key) is matches


# --- Queue depths (jobs.selectors.broker) -------------------------------------------------


def test_a_passive_declare_counts_the_messages_of_a_queue():
    connection = Connection("memory://")
    queue = Queue("contracts-depth", Exchange("contracts-depth"), "contracts-depth")
    with connection.channel() as channel:
        producer = Producer(channel)
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key,
                         declare=[queue])  # fmt: skip

        ok = channel.queue_declare(queue="contracts-depth", passive=True)

    assert queue_declare_ok_t._fields == ("queue", "message_count", "consumer_count")
    assert ok.message_count == 1
    connection.release()


def test_the_transports_name_their_driver_as_queue_depths_expects():
    assert kombu_redis.Transport.driver_type == "redis"
    assert pyamqp.Transport.driver_type == "amqp"


def test_a_redis_publish_batch_counts_its_room_in_redis_commands():
    """jobs_publish_many gives a batch room for 12 commands a message: it never flushes midway."""
    channel = SimpleNamespace(conn_or_acquire=lambda client=None: _yielding(redis.Redis()))

    def basic_publish(message, _publish_batch=None, **kwargs):
        _publish_batch.add("lpush", "queue", message)  # what the Redis channel adds per message

    channel.basic_publish = basic_publish
    batch = kombu_redis.PublishBatch(channel, max_size=12 * 3 + 1)

    for n in range(3):
        batch.publish(f"message-{n}")

    assert [args for args, _ in batch.pipeline.command_stack] == [
        ("LPUSH", "queue", f"message-{n}") for n in range(3)
    ]  # buffered, not executed: no server was asked
    assert batch._buffered == 3
    batch.discard()
    batch.close()
    assert parameters(Producer.batch) == ["self", "max_size"]
    with pytest.raises(ValueError, match="positive"):
        Producer.batch(None, max_size=0)


# --- Redis transport options (jobsite/settings.py) ----------------------------------------


def test_every_redis_transport_option_jobsite_sets_is_one_kombu_reads():
    """kombu ignores an option it does not know: a renamed one would silently stop working."""
    known = set(kombu_redis.Channel.from_transport_options)

    assert set(settings.CELERY_BROKER_TRANSPORT_OPTIONS) <= known


# --- Entry 68: reading a Redis broker's messages (jobs.selectors.broker) -------------------


def test_the_prefixing_client_leaves_lrange_and_hscan_unprefixed():
    client = kombu_redis.PrefixedStrictRedis(global_keyprefix="app:")

    assert client._prefix_args(["LRANGE", "default", 0, 10]) == ["LRANGE", "default", 0, 10]
    assert client._prefix_args(["HSCAN", "unacked", 0]) == ["HSCAN", "unacked", 0]
    assert client._prefix_args(["LPUSH", "default", "m"]) == ["LPUSH", "app:default", "m"]


def test_redis_channel_keys_for_a_queue_its_priorities_and_the_unacked_hash():
    channel = kombu_redis.Channel
    assert channel.unacked_key == "unacked"
    assert channel.sep == "\x06\x16"
    shaped = SimpleNamespace(sep=channel.sep, priority_steps=channel.priority_steps)
    shaped.priority = lambda n: kombu_redis.Channel.priority(shaped, n)
    names = {kombu_redis.Channel._q_for_pri(shaped, "default", p) for p in channel.priority_steps}
    assert names == {"default", "default\x06\x163", "default\x06\x166", "default\x06\x169"}


def test_a_redis_message_carries_its_task_id_in_headers_and_properties():
    message = kombu_redis.Channel.prepare_message(
        SimpleNamespace(default_priority=0), "body", headers={"id": "run-1"},
        properties={"correlation_id": "run-1"},
    )  # fmt: skip
    assert _run_id(json.dumps(message)) == "run-1"
    assert _run_id(json.dumps({**message, "headers": {}})) == "run-1"  # protocol 1
    assert _run_id(b"not json") == ""


def test_the_restore_mutex_expiry_is_a_transport_option_jobsite_sets():
    assert "unacked_mutex_expire" in kombu_redis.Channel.from_transport_options
    assert kombu_redis.Channel.unacked_mutex_expire == 300  # why Jobsite lowers it
    assert settings.CELERY_BROKER_TRANSPORT_OPTIONS["unacked_mutex_expire"] == 60
