"""Worker pools: prefork by default; threads and gevent run jobs too (real workers)."""

from __future__ import annotations

import uuid

import pytest

from jobs import services
from jobs.models import JobState
from tests.conftest import BROKERS, Worker, _reachable, service_unavailable, use_broker, wait_for

pytestmark = pytest.mark.broker


@pytest.fixture(
    params=[
        ("threads", "redis"),
        ("threads", "rabbitmq"),
        ("gevent", "redis"),
        ("gevent", "rabbitmq"),
    ],
    ids=lambda p: "-".join(p),
)
def pool_worker(request, _workers, transactional_db):
    pool, broker = request.param
    url = BROKERS[broker]
    if not _reachable(url):
        service_unavailable(f"{broker} is not reachable at {url}")
    # Its own queue: the session's prefork workers must not take the smoke jobs.
    worker = Worker(broker, url, _workers.db_url, name=f"{pool}-{broker}", pool=pool,
                    concurrency=4, queues=f"pool-{uuid.uuid4().hex[:8]}")  # fmt: skip
    worker.start()
    use_broker(url)
    yield worker
    use_broker(BROKERS["redis"])
    worker.stop()


def test_a_worker_with_another_pool_runs_jobs_and_records_them(pool_worker, alice, granted):
    runs = [
        services.job_submit(
            job_type=granted["count_primes"],
            params={"limit": 100_000},
            user=alice,
            options={"queue": pool_worker.queues},
        )
        for _ in range(3)
    ] + [
        services.job_submit(
            job_type=granted["send_mail"],
            params={"to": "pool@example.com", "subject": f"via {pool_worker.pool}", "body": "hi"},
            user=alice,
            options={"queue": pool_worker.queues},
        )
    ]

    done = [wait_for(run.pk) for run in runs]

    assert [r.state for r in done] == [JobState.SUCCESS] * 4
    assert all(r.result["primes"] == 9592 for r in done[:3])
    assert all(r.worker.startswith(f"{pool_worker.pool}-") for r in done)
    banner = {"threads": "(thread)", "gevent": "(gevent)"}[pool_worker.pool]
    assert f"concurrency: 4 {banner}" in pool_worker.output()  # really that pool
    mail = "".join(p.read_text() for p in pool_worker.mail_dir.glob("*.log"))
    assert f"via {pool_worker.pool}" in mail
