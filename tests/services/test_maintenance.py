"""Retention: old runs, their logs and Celery's result rows go, in batches."""

import uuid
from datetime import timedelta

from django.utils import timezone
from django_celery_results.models import TaskResult

from jobs import services
from jobs.models import Job, JobLog


def make(job_type, days_old: int, **fields) -> Job:
    created = timezone.now() - timedelta(days=days_old)
    job = Job.objects.create(id=str(uuid.uuid4()), task_name=job_type.task_name,
                             job_type=job_type, created_at=created, state="SUCCESS",
                             **fields)  # fmt: skip
    JobLog.objects.create(job=job, created_at=created, level="INFO", message="line")
    TaskResult.objects.create(task_id=job.id, status="SUCCESS")
    return job


def test_runs_past_retention_are_deleted_with_their_logs_and_results(job_types, settings):
    settings.JOBSITE_RETENTION_DAYS = 30
    primes = job_types["count_primes"]
    old = [make(primes, 40) for _ in range(7)]
    recent = make(primes, 5)
    parent_of_recent = make(primes, 45)
    recent.parent = parent_of_recent
    recent.save()

    deleted = services.jobs_cleanup(batch=3)  # several batches

    assert deleted == {"runs": 8, "task_results": 8}
    assert list(Job.objects.values_list("pk", flat=True)) == [recent.pk]
    assert JobLog.objects.count() == 1
    assert TaskResult.objects.count() == 1
    recent.refresh_from_db()
    assert recent.parent is None  # the link to a deleted run is cleared, not cascaded
    assert not any(Job.objects.filter(pk=job.pk).exists() for job in old)


def test_a_job_type_can_keep_its_runs_longer_or_shorter(job_types, settings):
    settings.JOBSITE_RETENTION_DAYS = 30
    mail, primes = job_types["send_mail"], job_types["count_primes"]
    mail.retention_days = 90
    mail.save()
    primes.retention_days = 3
    primes.save()
    kept_mail = make(mail, 60)
    gone_mail = make(mail, 100)
    gone_primes = make(primes, 4)
    other = make(job_types["flaky"], 20)

    services.jobs_cleanup()

    remaining = set(Job.objects.values_list("pk", flat=True))
    assert remaining == {kept_mail.pk, other.pk}
    assert gone_mail.pk not in remaining and gone_primes.pk not in remaining


def test_orphan_celery_results_past_retention_are_deleted_too(db, settings):
    settings.JOBSITE_RETENTION_DAYS = 30
    old = TaskResult.objects.create(task_id="old", status="SUCCESS")
    TaskResult.objects.filter(pk=old.pk).update(date_done=timezone.now() - timedelta(days=31))
    TaskResult.objects.create(task_id="new", status="SUCCESS")

    services.jobs_cleanup()

    assert list(TaskResult.objects.values_list("task_id", flat=True)) == ["new"]


def test_runs_that_expired_before_starting_are_marked_cancelled(job_types):
    primes = job_types["count_primes"]
    now = timezone.now()
    base = {"task_name": primes.task_name, "job_type": primes}
    expired = Job.objects.create(id="exp-1", expires_at=now - timedelta(minutes=5), **base)
    waiting = Job.objects.create(id="exp-2", expires_at=now + timedelta(minutes=5), **base)

    assert services.jobs_expire() == 1
    expired.refresh_from_db()
    waiting.refresh_from_db()
    assert expired.state == "REVOKED" and "Expired" in expired.error_message
    assert waiting.state == "PENDING"
