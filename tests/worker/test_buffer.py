"""Batched best-effort writes of the worker's hot path (jobs.worker.buffer.UpdateBuffer)."""

import time
import uuid

from jobs.models import Job
from jobs.worker.buffer import UpdateBuffer


def received_buffer(min_age: float) -> UpdateBuffer:
    return UpdateBuffer(
        "UPDATE jobs_job SET received_at = %s, worker = %s, state = 'RECEIVED' "
        "WHERE id = %s AND state = 'PENDING'",
        min_age=min_age,
        background=False,
    )


def test_a_buffered_write_waits_until_it_is_old_enough(db, alice):
    job = Job.objects.create(id=str(uuid.uuid4()), task_name="jobs.noop", submitted_by=alice)
    buffer = received_buffer(min_age=0.3)
    buffer.add((job.created_at, "w1@host", job.pk))

    assert buffer.flush() == 0  # too young: it may start (and be discarded) any moment
    assert Job.objects.get(pk=job.pk).state == "PENDING"
    time.sleep(0.35)
    assert buffer.flush() == 1
    assert Job.objects.get(pk=job.pk).state == "RECEIVED"


def test_a_discarded_buffered_write_is_never_made_and_shutdown_writes_the_rest(db, alice):
    moved_on, waiting = (
        Job.objects.create(id=str(uuid.uuid4()), task_name="jobs.noop", submitted_by=alice)
        for _ in range(2)
    )
    buffer = received_buffer(min_age=60)
    for job in (moved_on, waiting):
        buffer.add((job.created_at, "w1@host", job.pk))

    buffer.discard(moved_on.pk)  # acknowledged: started and finished already

    assert buffer.flush(everything=True) == 1
    assert Job.objects.get(pk=moved_on.pk).state == "PENDING"
    assert Job.objects.get(pk=waiting.pk).state == "RECEIVED"
