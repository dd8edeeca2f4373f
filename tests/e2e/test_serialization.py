"""Serialisation: JSON by default, msgpack selectable, compression, signed messages, and
pickle refused, all on real brokers and real workers."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from kombu import Producer, Queue
from kombu.serialization import loads

from jobs import routing, services
from jobs.models import Job, JobState
from jobsite.celery import app as celery_app
from tests.conftest import (
    BROKERS,
    ROOT,
    Worker,
    use_broker,
    wait_for,
)

MAIL = {"to": "someone@example.com", "body": "hello"}


def mails(worker: Worker) -> str:
    return "".join(p.read_text() for p in worker.mail_dir.glob("*.log"))


def send_mail(alice, job_types, subject: str, queue: str = "default") -> Job:
    return services.job_submit(
        job_type=job_types["send_mail"], params={**MAIL, "subject": subject}, user=alice,
        options={"queue": queue},
    )  # fmt: skip


def inject(url: str, subject: str, serializer: str, priority: int = 9) -> str:
    """Put a send_mail task message on the `default` queue by hand, as an attacker could."""
    task_id = str(uuid.uuid4())
    headers, properties, body, _ = celery_app.amqp.as_task_v2(
        task_id, "jobs.send_mail", args=(), kwargs={**MAIL, "subject": subject}
    )
    with celery_app.connection_for_write(url) as conn:
        Producer(conn.default_channel).publish(
            body, exchange="", routing_key="default", serializer=serializer, headers=headers,
            priority=routing.wire_priority(priority, url),
            correlation_id=properties["correlation_id"],
        )  # fmt: skip
    return task_id


# --- Pickle is refused --------------------------------------------------------------


@pytest.mark.broker
def test_an_injected_pickle_message_is_refused_and_the_worker_keeps_serving(worker, alice, granted):
    evil = inject(worker.url, "pickled subject", "pickle")
    # A normal run queued behind it, on the same queue: when it is done, the pickled
    # message has been dealt with, and the worker is still serving.
    good = wait_for(send_mail(alice, granted, "after the pickle").pk)

    assert good.state == JobState.SUCCESS
    sent = mails(worker)
    assert "after the pickle" in sent
    assert "pickled subject" not in sent  # never executed: no e-mail
    run = Job.objects.filter(pk=evil).first()
    assert run is None or (run.state != JobState.SUCCESS and run.started_at is None)
    assert "Refusing to deserialize untrusted content of type pickle" in worker.output()


# --- msgpack and compression ------------------------------------------------------------


@pytest.fixture
def celery_conf():
    """Change this process's Celery settings for one test (as the JOBSITE_* settings do)."""
    saved = {}

    def change(**values):
        for name, value in values.items():
            saved.setdefault(name, getattr(celery_app.conf, name))
            setattr(celery_app.conf, name, value)
        # Celery builds its message sender once, with the serializer and compression of
        # that moment: drop it so that the next publish uses the new values.
        celery_app.amqp.__dict__.pop("send_task_message", None)

    yield change
    for name, value in saved.items():
        setattr(celery_app.conf, name, value)
    celery_app.amqp.__dict__.pop("send_task_message", None)


def peek(url: str, queue: str):
    """The one message waiting in ``queue`` (no worker consumes it), then delete it."""
    # Celery's connection carries the Redis priority-steps options the queue was filled with.
    with celery_app.connection_for_write(url) as conn:
        bound = Queue(queue)(conn.default_channel)
        message = bound.get(no_ack=True)
        bound.delete()
    return message


def decode(message):
    # This process accepts JSON only (kombu disables msgpack until a consumer allows it).
    return loads(message.body, message.content_type, message.content_encoding, force=True)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request, transactional_db, live_broker):
    url = live_broker(request.param)
    use_broker(url)
    yield url
    use_broker(BROKERS["redis"])


@pytest.mark.broker
def test_messages_are_json_by_default(broker_url, alice, granted):
    queue = f"test-json-{uuid.uuid4().hex[:8]}"
    services.job_submit(
        job_type=granted["count_primes"], params={"limit": 10}, user=alice,
        options={"queue": queue},
    )  # fmt: skip

    message = peek(broker_url, queue)

    assert message.content_type == "application/json"
    assert message.decode()[1] == {"limit": 10}


@pytest.mark.broker
def test_msgpack_is_used_when_chosen(broker_url, alice, granted, celery_conf):
    celery_conf(task_serializer="msgpack")
    queue = f"test-msgpack-{uuid.uuid4().hex[:8]}"
    job = services.job_submit(
        job_type=granted["count_primes"], params={"limit": 10}, user=alice,
        options={"queue": queue},
    )  # fmt: skip

    message = peek(broker_url, queue)

    assert message.content_type == "application/x-msgpack"
    assert decode(message)[1] == {"limit": 10}
    assert job.options["serializer"] == "msgpack"


@pytest.mark.broker
def test_a_job_type_or_the_setting_compresses_its_messages(broker_url, alice, granted, celery_conf):
    queue = f"test-zlib-{uuid.uuid4().hex[:8]}"
    job = services.job_submit(
        job_type=granted["sum_results"], params={"field": "x" * 40}, user=alice,
        options={"queue": queue},
    )  # fmt: skip
    message = peek(broker_url, queue)
    assert job.options["compression"] == "zlib"  # declared on the job type
    assert message.headers["compression"] == "application/x-gzip"
    assert decode(message)[1] == {"field": "x" * 40}

    celery_conf(task_compression="bzip2")  # JOBSITE_COMPRESSION=bzip2
    queue = f"test-bz2-{uuid.uuid4().hex[:8]}"
    services.job_submit(
        job_type=granted["count_primes"], params={"limit": 10}, user=alice,
        options={"queue": queue},
    )  # fmt: skip
    message = peek(broker_url, queue)
    assert message.headers["compression"] == "application/x-bz2"
    assert decode(message)[1] == {"limit": 10}


@pytest.fixture
def msgpack_worker(broker_url, _workers):
    name = "redis" if broker_url.startswith("redis") else "rabbitmq"
    worker = Worker(name, broker_url, _workers.db_url, name=f"msgpack-{name}",
                    extra_env={"JOBSITE_SERIALIZER": "msgpack"}, concurrency=1,
                    queues=f"msgpack-{uuid.uuid4().hex[:8]}")  # fmt: skip
    worker.start()
    yield worker
    worker.stop()


@pytest.mark.broker
def test_a_msgpack_worker_runs_msgpack_jobs(msgpack_worker, alice, granted, celery_conf):
    celery_conf(task_serializer="msgpack")

    job = wait_for(send_mail(alice, granted, "packed", queue=msgpack_worker.queues).pk)

    assert job.state == JobState.SUCCESS
    assert "packed" in mails(msgpack_worker)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("JOBSITE_SERIALIZER", "pickle", "JOBSITE_SERIALIZER must be json or msgpack"),
        ("JOBSITE_COMPRESSION", "lzma", "JOBSITE_COMPRESSION must be empty, zlib or bzip2"),
        ("JOBSITE_SIGNING_KEY", "/nonexistent.key", "JOBSITE_SIGNING_KEY must name"),
    ],
)
def test_a_bad_serialisation_setting_stops_start_up(variable, value, message):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "jobsite.settings", variable: value}
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert message in result.stderr


# --- Message signing ------------------------------------------------------------------


def make_identity(directory: Path, name: str) -> tuple[Path, Path]:
    """A private key and a self-signed certificate, as files."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture
def signing(broker_url, _workers, tmp_path):
    """A worker that trusts only `trusted`'s certificate; `intruder` is someone else."""
    store = tmp_path / "trusted-certs"
    store.mkdir()
    trusted = make_identity(tmp_path, "trusted")
    intruder = make_identity(tmp_path, "intruder")
    (store / "trusted.pem").write_bytes(trusted[1].read_bytes())
    name = "redis" if broker_url.startswith("redis") else "rabbitmq"
    worker = Worker(
        name, broker_url, _workers.db_url, name=f"signed-{name}", concurrency=1,
        queues=f"signed-{uuid.uuid4().hex[:8]}",
        extra_env={"JOBSITE_SIGNING_KEY": str(trusted[0]), "JOBSITE_SIGNING_CERT": str(trusted[1]),
                   "JOBSITE_SIGNING_CERT_STORE": str(store)},
    )  # fmt: skip
    worker.start()
    yield worker, trusted, intruder, store
    worker.stop()


def sign_as(identity: tuple[Path, Path], store: Path) -> None:
    """Make this process's `auth` serializer sign with ``identity``."""
    from celery.security.serialization import register_auth

    key, cert = identity
    register_auth(key.read_text(), None, cert.read_text(), str(store / "*.pem"), "sha256")


@pytest.mark.broker
def test_only_messages_signed_by_a_trusted_key_are_run(signing, alice, granted, celery_conf):
    worker, trusted, intruder, store = signing
    celery_conf(task_serializer="auth")

    sign_as(intruder, store)
    # The forged run first, the genuine one behind it on the worker's only queue.
    forged = send_mail(alice, granted, "forged signature", queue=worker.queues)
    sign_as(trusted, store)
    genuine = wait_for(send_mail(alice, granted, "genuine signature", queue=worker.queues).pk)

    assert genuine.state == JobState.SUCCESS
    sent = mails(worker)
    assert "genuine signature" in sent
    assert "forged signature" not in sent
    forged.refresh_from_db()
    assert forged.state != JobState.SUCCESS and forged.started_at is None
    log = worker.output()
    assert "certificate not found" in log or "SecurityError" in log
