"""The single submit path's database work stays small (issue 26, item 4).

``services.job_submit`` is Jobsite's one-at-a-time path (the form, POST /api/runs/).
Each statement it sends is a round trip per submit; this test counts them, so that a
change that adds one fails here and has to say why.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs import services
from jobs.models import AuditEntry, Job, JobSource
from jobsite.celery import app
from tests.conftest import BROKERS, use_broker

pytestmark = pytest.mark.broker  # the run is published on commit

# The permission check, the run's INSERT with its audit entry's (one statement: one
# round trip, no BEGIN or COMMIT) and, once published, the UPDATE of sent_at.
SINGLE_SUBMIT_QUERIES = 3


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_single_submit_sends_no_more_statements_than_it_needs(
    broker, live_broker, transactional_db, alice, granted
):
    use_broker(live_broker(broker))
    noop = granted["noop"]
    submit = {"job_type": noop, "params": {}, "user": alice, "options": {"queue": "bench"},
              "source": JobSource.API}  # fmt: skip
    services.job_submit(**submit)  # the first one warms caches (content types, the pool) up

    try:
        with CaptureQueriesContext(connection) as queries:  # outside a transaction, as a view
            job = services.job_submit(**submit)
    finally:
        with app.connection_for_write() as conn:  # no worker of a later test runs them
            conn.default_channel.queue_purge("bench")
        use_broker(BROKERS["redis"])

    statements = [q["sql"] for q in queries.captured_queries]
    assert len(statements) <= SINGLE_SUBMIT_QUERIES, "\n".join(s[:200] for s in statements)
    job.refresh_from_db()
    assert job.sent_at is not None  # published after the commit
    assert AuditEntry.objects.filter(target_type="run", target_id=job.pk, action="submit").exists()
    assert Job.objects.filter(pk=job.pk, state="PENDING").exists()


def test_the_run_and_its_audit_entry_are_written_together(db, alice, granted):
    job = services.job_submit(job_type=granted["noop"], params={}, user=alice,
                              options={"queue": "bench"}, source=JobSource.API)  # fmt: skip

    entry = AuditEntry.objects.get(target_type="run", target_id=job.pk)
    assert (entry.actor, entry.actor_name, entry.action) == (alice, "alice", "submit")
    assert entry.target_repr == str(granted["noop"])
    assert entry.details == {"params": {}, "source": "api"}
    assert Job.objects.get(pk=job.pk).submitted_by == alice


def test_a_clashing_run_writes_no_audit_entry_either(transactional_db, alice, granted):
    from django.db import IntegrityError

    from jobs.services.runs import _insert_together

    first = Job.objects.create(id="a-run-already-stored", task_name="jobs.noop", submitted_by=alice)
    clash = Job(id=first.pk, job_type=granted["noop"], task_name="jobs.noop", params={},
                options={}, submitted_by=alice, queue="bench")  # fmt: skip
    entry = AuditEntry(actor=alice, actor_name="alice", action="submit", target_type="run",
                       target_id="clash-marker", details={})  # fmt: skip

    with pytest.raises(IntegrityError):
        _insert_together(clash, entry)  # outside a transaction: one statement, all or none

    assert not AuditEntry.objects.filter(target_id="clash-marker").exists()
