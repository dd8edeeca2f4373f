"""Celery result backend: django-celery-results' database backend, plus Job tracking.

Every state Celery stores passes through ``_store_result`` in the worker, before the
message is acknowledged. On PostgreSQL, a run's final state is ONE statement in
autocommit: a data-modifying CTE that updates the Job and upserts Celery's TaskResult,
atomic and durable on return, one round trip to the database per run. Elsewhere (SQLite,
MySQL) the same two writes share one transaction. STARTED writes no TaskResult row: it is
buffered on the Job (jobs.worker.buffer). RETRY and runs without a Job row go the ORM way.
"""

import json
import time

import django
from django.apps import apps

if not apps.apps_ready:
    # Celery imports its result backend by name wherever results are touched, and the
    # celery CLI (`call`, `result`, `inspect`, ...) does so before anyone has set Django
    # up: Celery's Django fix-up calls django.setup() only in the worker. The models
    # imported below need the app registry, so this module sets Django up itself, for
    # any project that names it as CELERY_RESULT_BACKEND (django-celery-results#20).
    # During django.setup() itself the apps are ready before any module can import this.
    django.setup()

from celery import states
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone
from django_celery_results.backends.database import DatabaseBackend
from django_celery_results.managers import TaskResultManager
from django_celery_results.models import (  # type: ignore[attr-defined]
    ChordCounter,
    TaskResult,
)

from jobs.models import Job
from jobs.worker import buffer, tracking

_UPSERT_FIELDS = [
    "status", "result", "traceback", "meta", "content_encoding", "content_type",
    "periodic_task_name", "task_name", "task_args", "task_kwargs", "worker", "date_done",
]  # fmt: skip


# celery-types' stubs of django-celery-results predate ChordCounter (imported above) and
# store_result's periodic_task_name and worker arguments: hence the two type ignores.
class UpsertingTaskResultManager(TaskResultManager):
    def store_result(self, content_type, content_encoding, task_id, result, status,  # type: ignore[override]
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


# The TaskResult half of the final write: the columns django-celery-results stores.
_TASK_RESULT_COLUMNS = [*_UPSERT_FIELDS, "task_id", "date_created"]
# Built once from the constants above: no value is ever formatted into SQL.
_TASK_RESULT_UPSERT = (  # noqa: S608
    'INSERT INTO "django_celery_results_taskresult" ({columns}) VALUES ({values}) '
    'ON CONFLICT ("task_id") DO UPDATE SET {updates}'
).format(
    columns=", ".join(f'"{c}"' for c in _TASK_RESULT_COLUMNS),
    values=", ".join(["%s"] * len(_TASK_RESULT_COLUMNS)),
    updates=", ".join(f'"{c}" = EXCLUDED."{c}"' for c in _UPSERT_FIELDS),
)
# The Job half: tracking.final_job_values() gives the parameters, in this order. A run
# already final (cancelled meanwhile) keeps its state; the count says whether a row moved.
_JOB_SET = {
    states.SUCCESS: '"result" = %s, "result_file" = COALESCE(NULLIF(%s, \'\'), "result_file")',
    states.FAILURE: '"exception_type" = %s, "error_message" = %s, "traceback" = %s',
}
_JOB_SET[states.REVOKED] = _JOB_SET[states.FAILURE]
_FINAL_TEMPLATE = (
    'WITH job AS (UPDATE "jobs_job" SET "state" = %s, '
    '"worker" = COALESCE(NULLIF(%s, \'\'), "worker"), '
    '"started_at" = COALESCE(%s, "started_at"), '
    '"received_at" = COALESCE("received_at", %s), "finished_at" = %s, {job_set} '
    "WHERE \"id\" = %s AND \"state\" NOT IN ('SUCCESS', 'FAILURE', 'REVOKED') "
    "RETURNING 1), stored AS ({task_result}) "
    "SELECT count(*) FROM job"
)
_FINAL_SQL = {
    status: _FINAL_TEMPLATE.format(job_set=job_set, task_result=_TASK_RESULT_UPSERT)
    for status, job_set in _JOB_SET.items()
}


# Group commit (jobs.worker.commit): the worker's main process stores the final state of many
# successful runs in one statement, then acknowledges their messages. Same two writes
# as _FINAL_SQL, for a set of rows; the TaskResult rows are written for the Job rows
# that moved (a run already final, e.g. cancelled meanwhile, keeps both as they are).
# The rows travel as ONE parameter, a JSON array of objects (success_row()s, keys as
# below; times in seconds since the epoch): the statement's text is the same for any
# number of runs, so neither psycopg (which splits a query's placeholders in Python)
# nor PostgreSQL's parser pays per run, and building the batch is one json.dumps.
_BATCH_FIELDS = {
    "id": "text", "worker": "text", "started_at": "float8", "received_at": "float8",
    "finished_at": "float8", "job_result": "text", "encoded": "text", "meta": "text",
    "content_encoding": "text", "content_type": "text", "periodic_task_name": "text",
    "task_name": "text", "task_args": "text", "task_kwargs": "text",
}  # fmt: skip
_BATCH_VALUES = {
    "started_at": "to_timestamp(r.started_at)",
    "received_at": "to_timestamp(r.received_at)",
    "finished_at": "to_timestamp(r.finished_at)",
    "job_result": "r.job_result::jsonb",
}
_BATCH_TASK_RESULT = {
    "status": "'SUCCESS'", "traceback": "NULL", "date_done": "v.finished_at",
    "task_id": "v.id", "result": "v.encoded",
}  # fmt: skip
BATCH_FINAL_SQL = (  # noqa: S608 - built from the constants above, values are parameters
    "WITH v AS (SELECT {selected}, %s::timestamptz AS date_created "
    "FROM json_to_recordset(%s::json) AS r({fields})), "
    'job AS (UPDATE "jobs_job" AS j SET "state" = \'SUCCESS\', '
    '"worker" = COALESCE(NULLIF(v.worker, \'\'), j."worker"), '
    '"started_at" = COALESCE(v.started_at, j."started_at"), '
    '"received_at" = COALESCE(j."received_at", v.received_at), '
    '"finished_at" = v.finished_at, "result" = v.job_result '
    "FROM v WHERE j.\"id\" = v.id AND j.\"state\" NOT IN ('SUCCESS', 'FAILURE', 'REVOKED') "
    'RETURNING j."id"), '
    'stored AS (INSERT INTO "django_celery_results_taskresult" ({tr_columns}) '
    'SELECT {tr_values} FROM v JOIN job ON job."id" = v.id '
    'ON CONFLICT ("task_id") DO UPDATE SET {updates}) '
    'SELECT "id" FROM job'
).format(
    selected=", ".join(f"{_BATCH_VALUES.get(f, f'r.{f}')} AS {f}" for f in _BATCH_FIELDS),
    fields=", ".join(f"{name} {kind}" for name, kind in _BATCH_FIELDS.items()),
    tr_columns=", ".join(f'"{c}"' for c in _TASK_RESULT_COLUMNS),
    tr_values=", ".join(_BATCH_TASK_RESULT.get(c, f"v.{c}") for c in _TASK_RESULT_COLUMNS),
    updates=", ".join(f'"{c}" = EXCLUDED."{c}"' for c in _UPSERT_FIELDS),
)


# Runs of this pool process whose successful final state is left to the main process.
DEFERRED: set[str] = set()

# How long a chord part waits for its group's counter to be committed (see below).
CHORD_COUNTER_WAIT = 10.0  # seconds


class JobResultBackend(DatabaseBackend):
    TaskModel = _TaskResults

    def on_chord_part_return(self, request, state, result, **kwargs):
        """Wait for the chord's counter before counting this part.

        A workflow is published inside the transaction that marks its steps sent, and
        django-celery-results creates the chord's ChordCounter in that transaction too,
        so a fast first part can finish before it commits. The stock backend then logs
        "Can't find ChordCounter" and drops the part, and the chord never completes.
        """
        if request.group and request.id:
            deadline = time.monotonic() + CHORD_COUNTER_WAIT
            counters = ChordCounter.objects.filter(group_id=request.group)
            while not counters.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return super().on_chord_part_return(request, state, result, **kwargs)

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
        if status == states.SUCCESS and _deferred(request):
            # The worker's main process stores it with others, then acknowledges
            # (jobs.worker.commit): this pool process goes on to its next run at once.
            buffer.started.discard(task_id)
            DEFERRED.add(task_id)  # jobs.worker.commit's tracer hands the result over
            return result
        if status == states.STARTED:
            tracking.record_state(task_id, status, result, traceback, request)
            return result
        fast = status in tracking.FINAL and connection.vendor == "postgresql"
        if (
            fast
            and tracking.tracked(request)
            and self._store_final(task_id, result, status, traceback, request)
        ):
            return result
        with transaction.atomic():
            stored = super()._store_result(
                task_id, result, status, traceback=traceback, request=request, using=using
            )
            tracking.record_state(task_id, status, result, traceback, request)
        return stored

    def _store_final(self, task_id, result, status, traceback, request) -> bool:
        """The run's Job and TaskResult in one statement; False if no Job row moved."""
        tr = self._task_result_parts(result, request, traceback)
        now = timezone.now()
        task_result = [
            status, tr["encoded"], traceback, tr["meta"], tr["content_encoding"],
            tr["content_type"], tr["periodic_task_name"], tr["task_name"], tr["task_args"],
            tr["task_kwargs"], tr["worker"], now, task_id, now,
        ]  # fmt: skip
        job = tracking.final_job_values(status, result, traceback, request, now)
        buffer.started.discard(task_id)  # moot: the final write carries started_at
        with connection.cursor() as cursor:
            cursor.execute(_FINAL_SQL[status], [*job, task_id, *task_result])
            (moved,) = cursor.fetchone()
        if moved:
            return True
        # No row moved: a run Jobsite has not seen yet (its row is created by the ORM
        # path), or one already final (cancelled meanwhile: the path leaves it alone).
        return tracking.job_is_final(task_id)

    def _task_result_parts(self, result, request, traceback) -> dict:
        """What django-celery-results stores of a run, encoded as its backend does."""
        content_type, content_encoding, encoded = self.encode_content(result)
        meta = {
            **self._get_meta_from_request(request),
            "children": self.current_task_children(request),
        }
        _, _, encoded_meta = self.encode_content(meta)
        return {
            **self._get_extended_properties(request, traceback),
            "encoded": encoded, "meta": encoded_meta,
            "content_type": content_type, "content_encoding": content_encoding,
        }  # fmt: skip

    def success_row(self, request, result, started_at, received_at, finished_at) -> dict:
        """One run's row of BATCH_FINAL_SQL, from the main process's request.

        Times are seconds since the epoch (``received_at`` may be None).
        """

        tr = self._task_result_parts(result, request, None)
        encoder = Job._meta.get_field("result").encoder
        return {
            "id": request.id, "worker": request.hostname or "", "started_at": started_at,
            "received_at": received_at, "finished_at": finished_at,
            # SQL NULL for None, as the ORM stores it.
            "job_result": None if result is None else json.dumps(result, cls=encoder),
            **{key: tr[key] for key in (
                "encoded", "meta", "content_encoding", "content_type", "periodic_task_name",
                "task_name", "task_args", "task_kwargs",
            )},
        }  # fmt: skip


def _deferred(request) -> bool:
    """Whether the main process stores this successful run's final state (jobs.worker.commit).

    It asked to (``jobsite_defer`` travels with the request), unless the run produced
    something only this process knows: a result file, child tasks, custom meta. Then
    it is stored here, now; the main process's write finds the row final and skips it.
    """
    if not getattr(request, "jobsite_defer", False):
        return False
    return not (
        getattr(request, "jobsite_result_file", None)
        or getattr(request, "children", None)
        or getattr(request, "meta", None)
    )
