"""redis-py 8.1.0 details jobs.worker.guard (the cancelled-runs subscription) and
jobs.beat.scheduler (the beat lock) rely on."""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection
from redis.lock import Lock
from redis.retry import Retry

from .conftest import parameters


class Watcher:
    def __init__(self) -> None:
        self.called: list = []

    def on_connect(self, connection) -> None:
        self.called.append(connection)


def test_a_connection_takes_and_gives_back_a_connect_callback():
    """RevokedRuns learns of a silent reconnect (what was published meanwhile is lost)."""
    connection = redis.connection.Connection()  # not connected: nothing is sent
    watcher = Watcher()

    connection.register_connect_callback(watcher.on_connect)
    connection.deregister_connect_callback(watcher.on_connect)

    assert parameters(AbstractConnection.register_connect_callback) == ["self", "callback"]
    assert parameters(AbstractConnection.deregister_connect_callback) == ["self", "callback"]
    assert watcher.called == []


def test_a_connect_callback_must_be_a_bound_method_held_weakly():
    """RevokedRuns registers its own bound method, and the object lives on (functools.cache)."""
    connection = redis.connection.Connection()

    with pytest.raises(TypeError, match="bound method"):
        connection.register_connect_callback(lambda conn: None)


def test_a_pubsub_has_no_connection_until_it_subscribes():
    pubsub = redis.Redis().pubsub()

    assert pubsub.connection is None  # guard._close checks it before deregistering
    assert "timeout" in parameters(pubsub.get_message)
    pubsub.close()


def test_a_retry_of_no_attempts_is_built_as_the_subscriber_builds_it():
    retry = Retry(NoBackoff(), 0, supported_errors=(redis.ConnectionError,))

    assert parameters(Retry.__init__)[:4] == ["self", "backoff", "retries", "supported_errors"]
    attempts = []

    def fail():
        attempts.append(True)
        raise redis.ConnectionError("down")

    with pytest.raises(redis.ConnectionError):
        retry.call_with_retry(fail, lambda error: None)
    assert attempts == [True]  # no silent second try


def test_the_beat_lock_has_an_owner_token_a_ttl_and_reacquire():
    lock = redis.Redis().lock("contracts:lock", timeout=30, thread_local=False)

    assert isinstance(lock, Lock)
    assert lock.timeout == 30
    assert callable(lock.reacquire)
    assert "blocking" in parameters(Lock.acquire)
