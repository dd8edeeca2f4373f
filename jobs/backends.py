"""Celery result backend: django-celery-results' database backend, plus Job tracking.

Every state Celery stores (STARTED, RETRY, SUCCESS, FAILURE, REVOKED) passes through
``_store_result``, in the worker, before the message is acknowledged; recording the
Job state here makes it durable at the same point Celery's own TaskResult is.
"""

from django_celery_results.backends.database import DatabaseBackend

from jobs import tracking


class JobResultBackend(DatabaseBackend):
    def _store_result(self, task_id, result, status, traceback=None, request=None, using=None):
        stored = super()._store_result(
            task_id, result, status, traceback=traceback, request=request, using=using
        )
        tracking.record_state(task_id, status, result, traceback, request)
        return stored
