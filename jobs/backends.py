"""Celery result backend: django-celery-results' database backend, plus Job tracking.

Every state Celery stores passes through ``_store_result`` in the worker, before the
message is acknowledged. A final state (and a retry) is written to Celery's TaskResult
and to the Job in ONE transaction — one commit per run on the hot path — and the
TaskResult row is upserted in one statement instead of get_or_create + save.
STARTED writes no TaskResult row: it is buffered on the Job (jobs.buffer).
"""

from celery import states
from django.db import InterfaceError, OperationalError, connection, transaction
from django_celery_results.backends.database import DatabaseBackend
from django_celery_results.managers import TaskResultManager
from django_celery_results.models import TaskResult

from jobs import tracking

_UPSERT_FIELDS = [
    "status", "result", "traceback", "meta", "content_encoding", "content_type",
    "periodic_task_name", "task_name", "task_args", "task_kwargs", "worker", "date_done",
]  # fmt: skip


class UpsertingTaskResultManager(TaskResultManager):
    def store_result(self, content_type, content_encoding, task_id, result, status,
                     traceback=None, meta=None, periodic_task_name=None, task_name=None,
                     task_args=None, task_kwargs=None, worker=None, using=None,
                     **kwargs):  # fmt: skip
        row = TaskResult(
            task_id=task_id, status=status, result=result, traceback=traceback, meta=meta,
            content_encoding=content_encoding, content_type=content_type,
            periodic_task_name=periodic_task_name, task_name=task_name,
            task_args=task_args, task_kwargs=task_kwargs, worker=worker,
        )  # fmt: skip
        self.using(using).bulk_create(
            [row], update_conflicts=True, unique_fields=["task_id"], update_fields=_UPSERT_FIELDS
        )
        return row


class _TaskResults:
    """What DatabaseBackend calls TaskModel: TaskResult with the upserting manager."""

    DoesNotExist = TaskResult.DoesNotExist
    _default_manager = UpsertingTaskResultManager()
    _default_manager.model = TaskResult


class JobResultBackend(DatabaseBackend):
    TaskModel = _TaskResults

    def exception_safe_to_retry(self, exc) -> bool:
        """A dropped database connection: reconnect and store again.

        django-celery-results only recognises psycopg2's InterfaceError; with psycopg 3
        a killed connection raises Django's OperationalError or InterfaceError. With
        result_backend_always_retry, Celery then retries the store (bounded).
        """
        if isinstance(exc, (OperationalError, InterfaceError)):
            connection.close()
            return True
        return super().exception_safe_to_retry(exc)

    def _store_result(self, task_id, result, status, traceback=None, request=None, using=None):
        if status == states.STARTED:
            tracking.record_state(task_id, status, result, traceback, request)
            return result
        with transaction.atomic():
            stored = super()._store_result(
                task_id, result, status, traceback=traceback, request=request, using=using
            )
            tracking.record_state(task_id, status, result, traceback, request)
        return stored
