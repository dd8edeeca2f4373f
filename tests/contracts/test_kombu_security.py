"""kombu 5.7.0: where a compressed body is inflated, which Jobsite's capped decoders
(jobs/worker/compression.py) replace, and where a refusal goes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from kombu import Message, compression
from kombu.messaging import Consumer


class Refused(ValueError):
    pass


@pytest.fixture
def refusing_zlib():
    """kombu's zlib decoder replaced, as compression.install does, then put back."""
    saved = dict(compression._decoders)
    calls: list[bytes] = []

    def decode(body: bytes) -> bytes:
        calls.append(body)
        raise Refused("too large")

    compression.register(compression.get_encoder("zlib")[0], decode, "application/x-gzip")
    yield calls
    compression._decoders.clear()
    compression._decoders.update(saved)


@pytest.mark.parametrize("alias", ["zlib", "gzip", "application/x-gzip"])
def test_a_message_is_inflated_as_it_is_built_through_the_registered_decoder(refusing_zlib, alias):
    message = Message(body=b"compressed", headers={"compression": alias})

    assert refusing_zlib == [b"compressed"]  # in Message.__init__, before anyone reads it
    assert message.body == b"compressed"  # left as it came
    assert isinstance(message.errors[0][1], Refused)


def test_a_refused_body_goes_to_the_consumers_on_decode_error(refusing_zlib):
    seen: list = []
    channel = SimpleNamespace()  # no message_to_python: the message is used as given
    consumer = Consumer.__new__(Consumer)
    consumer.channel, consumer.accept = channel, None
    consumer.on_message = lambda message: seen.append("on_message")
    consumer.on_decode_error = lambda message, exc: seen.append(exc)
    message = Message(body=b"compressed", headers={"compression": "zlib"})

    consumer._receive_callback(message)

    assert len(seen) == 1 and isinstance(seen[0], Refused)
