"""A compressed "bomb" on the broker is refused before it is inflated in the worker."""

from __future__ import annotations

import bz2
import time
import uuid
import zlib
from pathlib import Path

import pytest
from kombu import Exchange, Producer
from kombu import compression as kombu_compression

from jobs import services
from jobs.models import AuditEntry, Job
from jobs.worker import compression
from jobsite.celery import app as celery_app
from tests.conftest import wait_for

pytestmark = pytest.mark.broker

INFLATED = 256 * 1024 * 1024  # bytes each bomb decompresses to
BOUND = 64 * 1024 * 1024  # how much the worker's peak memory may grow meanwhile


def _bomb(compressor) -> bytes:
    """A task body of INFLATED bytes, compressed without ever holding it whole."""
    parts = [compressor.compress(b'[[], {"limit": 10, "padding": "')]
    chunk = b"x" * (1024 * 1024)
    parts += [compressor.compress(chunk) for _ in range(INFLATED // len(chunk))]
    parts += [compressor.compress(b'"}, {}]'), compressor.flush()]
    return b"".join(parts)


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {
        "application/x-gzip": _bomb(zlib.compressobj(9)),
        "application/x-bz2": _bomb(bz2.BZ2Compressor(9)),
    }


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def _reset_peak_rss(pid: int) -> None:
    # "5" resets the peak resident set size to the current one (Linux 4.0+).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _rejected(ids: set[str], timeout: float = 20) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = AuditEntry.objects.filter(action="message_rejected", target_id__in=ids)
        found = {entry.target_id: entry.details["reason"] for entry in entries}
        if set(found) == ids:
            return found
        time.sleep(0.2)
    raise AssertionError(f"not all bombs were recorded as rejected: {found}")


def test_a_zlib_or_bzip2_bomb_is_refused_and_recorded_with_memory_bounded(
    worker, alice, granted, bombs
):
    pid = worker.process.pid  # the worker's main process: kombu decodes messages there
    _reset_peak_rss(pid)
    before = _peak_rss(pid)
    ids = {content_type: str(uuid.uuid4()) for content_type in bombs}
    headers = {"lang": "py", "task": "jobs.count_primes", "argsrepr": "", "kwargsrepr": ""}
    with celery_app.connection_for_write(worker.url) as conn:
        producer = Producer(
            conn.channel(), exchange=Exchange("default", type="direct"), routing_key="default"
        )
        for content_type, body in bombs.items():
            producer.publish(
                body,
                content_type="application/json",
                content_encoding="utf-8",
                headers={**headers, "id": ids[content_type], "compression": content_type},
            )

    job_type = granted["count_primes"]
    params, _ = job_type.spec.clean_params({"limit": "1000"})
    after = services.job_submit(
        job_type=job_type, params=params, user=alice, options={"queue": "default"}
    )
    assert wait_for(after.id).state == "SUCCESS"  # the worker survived and keeps serving
    reasons = _rejected(set(ids.values()))

    assert worker.process.poll() is None
    assert _peak_rss(pid) - before < BOUND
    for task_id in ids.values():
        assert "decompresses past" in reasons[task_id], reasons[task_id]
        assert not Job.objects.filter(pk=task_id).exists()  # never reached a pool process


@pytest.fixture
def capped_here():
    """Capped decoders in this test process, kombu's own again afterwards."""
    saved = dict(kombu_compression._decoders)
    compression.install(1024)
    yield
    kombu_compression._decoders.update(saved)


@pytest.mark.parametrize("codec", ["zlib", "bzip2", "lzma"])
def test_capped_decoders_keep_kombus_formats_and_refuse_past_the_limit(codec, capped_here):
    fits, content_type = kombu_compression.compress(b"y" * 1024, codec)
    over, _ = kombu_compression.compress(b"y" * 1025, codec)

    assert kombu_compression.decompress(fits, content_type) == b"y" * 1024
    with pytest.raises(compression.TooLarge, match="decompresses past 1024 bytes"):
        kombu_compression.decompress(over, content_type)
    with pytest.raises(ValueError, match="truncated"):
        kombu_compression.decompress(fits[: len(fits) // 2], content_type)
