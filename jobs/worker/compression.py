"""Decompression with a cap, for the messages the worker's main process receives.

kombu decompresses a message's body as it builds the Message (``Message.__init__``),
before the consumer can compare its size with JOBSITE_MAX_MESSAGE_BYTES: a few hundred
kilobytes of zlib or a few kilobytes of bzip2 put on the broker inflate to gigabytes in
the worker's main process. These decoders, registered with kombu in place of its own
for the same content types, stop at the limit instead and raise ``TooLarge``; kombu
then hands the message to the consumer's ``on_decode_error``, which records it and
acknowledges it (it is never retried).

The formats stay kombu's own (``application/x-gzip`` is zlib data, not gzip), so
messages compressed by any Celery publisher decode as before. Compressing is unchanged.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from typing import Any

from kombu import compression

KOMBU_DECODERS: dict[str, tuple[str, Callable[[], Any]]] = {
    "application/x-gzip": ("zlib", zlib.decompressobj),
    "application/x-bz2": ("bzip2", bz2.BZ2Decompressor),
    "application/x-lzma": ("lzma", lzma.LZMADecompressor),
}


class TooLarge(ValueError):
    """A compressed message body decompresses past the limit."""


def _capped(name: str, new_decompressor: Callable[[], Any], limit: int) -> Callable:
    def decode(body: bytes) -> bytes:
        decompressor = new_decompressor()
        # At most limit + 1 bytes come out, however small the input: one byte more than
        # allowed is enough to know the body is too large.
        out = decompressor.decompress(body, limit + 1)
        if len(out) > limit:
            raise TooLarge(f"{name} message body decompresses past {limit} bytes: refused")
        if not decompressor.eof:
            raise ValueError(f"{name} message body is truncated")
        return out

    return decode


def _refused(content_type: str) -> Callable:
    def decode(body: bytes) -> bytes:
        raise TooLarge(f"{content_type} message bodies are refused (no capped decoder)")

    return decode


def install(limit: int) -> None:
    """Register capped decoders for kombu's zlib, bzip2 and lzma, keeping its encoders.

    Any other codec kombu found installed (brotli, zstd) has no capped decoder here and
    is refused rather than inflated without a bound.
    """
    for content_type in compression.encoders():
        # kombu's own encoder (compressing is unchanged); its stub types the pair wrongly.
        encoder: Callable = compression.get_encoder(content_type)[0]  # type: ignore[index]
        if content_type in KOMBU_DECODERS:
            name, new_decompressor = KOMBU_DECODERS[content_type]
            decoder = _capped(name, new_decompressor, limit)
        else:
            decoder = _refused(content_type)
        compression.register(encoder, decoder, content_type)
