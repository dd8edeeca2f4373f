"""django-celery-results 2.6.0 internals behind jobs.worker.backend (the one-statement final
write, the upserting manager, the retry and chord workarounds) and jobs.admin.records."""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
from types import SimpleNamespace

import pytest
from celery.app.task import Context
from django.contrib import admin
from django.db import OperationalError
from django_celery_results import admin as results_admin
from django_celery_results.backends.database import DatabaseBackend
from django_celery_results.managers import TaskResultManager
from django_celery_results.models import GroupResult, TaskResult

from jobs.admin.records import FastGroupResultAdmin, FastTaskResultAdmin
from jobs.worker import backend as jobsite_backend
from jobs.worker.backend import JobResultBackend, UpsertingTaskResultManager

from .conftest import parameters

# Columns of TaskResult that Jobsite's INSERT leaves to their defaults, on purpose:
# the primary key, and date_started (stamped by django-celery-results on STARTED, a state
# for which Jobsite writes no TaskResult row: STARTED is buffered on the Job).
NOT_WRITTEN = {"id", "date_started"}


def request(**extra) -> Context:
    fields = {
        "id": "run-1", "task": "jobs.noop", "hostname": "w1@host", "args": [1],
        "kwargs": {"a": 2}, "argsrepr": "(1,)", "kwargsrepr": "{'a': 2}",
        "periodic_task_name": "nightly",
    }  # fmt: skip
    return Context({**fields, **extra})


class Recorder:
    """What DatabaseBackend calls TaskModel, recording what it would store."""

    DoesNotExist = TaskResult.DoesNotExist

    def __init__(self) -> None:
        self.stored: list[dict] = []
        self._default_manager = SimpleNamespace(store_result=lambda **kw: self.stored.append(kw))


# --- The fixed column list of the final write ---------------------------------------------


def test_the_insert_writes_every_taskresult_column_but_the_ones_left_out_on_purpose():
    columns = {field.column for field in TaskResult._meta.concrete_fields}

    assert set(jobsite_backend._TASK_RESULT_COLUMNS) == columns - NOT_WRITTEN
    assert len(set(jobsite_backend._TASK_RESULT_COLUMNS)) == len(
        jobsite_backend._TASK_RESULT_COLUMNS
    )


def test_the_upsert_updates_only_concrete_non_key_columns():
    updatable = {
        field.column
        for field in TaskResult._meta.concrete_fields
        if not field.primary_key and not field.unique
    }

    assert set(jobsite_backend._UPSERT_FIELDS) <= updatable
    assert TaskResult._meta.get_field("task_id").unique  # ON CONFLICT ("task_id")
    assert TaskResult._meta.db_table == "django_celery_results_taskresult"


# --- What the stock backend stores, and Jobsite's copy of it ---------------------------------


@pytest.mark.parametrize("status", ["SUCCESS", "FAILURE", "RETRY", "STARTED"])
def test_the_stock_backend_hands_its_manager_only_what_the_upserting_manager_takes(app, status):
    stock = DatabaseBackend(app=app)
    stock.TaskModel = Recorder()

    stock._store_result("run-1", {"n": 1}, status, traceback="tb", request=request())

    (stored,) = stock.TaskModel.stored
    accepted = set(parameters(UpsertingTaskResultManager.store_result)) - {"self", "kwargs"}
    extra = set(stored) - accepted
    # date_started (STARTED only) falls into **kwargs and is dropped: Jobsite never
    # sends STARTED through this path (JobResultBackend._store_result returns first).
    assert extra == ({"date_started"} if status == "STARTED" else set())


def test_the_upserting_manager_takes_the_parameters_of_the_stock_one():
    assert parameters(UpsertingTaskResultManager.store_result) == parameters(
        TaskResultManager.store_result
    )


def test_jobsites_one_statement_write_stores_what_the_stock_backend_would(app):
    stock = DatabaseBackend(app=app)
    stock.TaskModel = Recorder()
    ours = JobResultBackend(app=app)
    run = request(meta={"custom": 1})

    stock._store_result("run-1", {"n": 1}, "FAILURE", traceback="tb", request=run)
    parts = ours._task_result_parts({"n": 1}, run, "tb")

    (stored,) = stock.TaskModel.stored
    for key in ("content_type", "content_encoding", "meta", "periodic_task_name",
                "task_name", "task_args", "task_kwargs", "worker", "traceback"):  # fmt: skip
        assert parts[key] == stored[key], key
    assert parts["encoded"] == stored["result"]


def test_the_backend_helpers_jobsite_calls_keep_their_shape(app):
    stock = DatabaseBackend(app=app)

    assert parameters(DatabaseBackend._get_extended_properties) == [
        "self", "request", "traceback",
    ]  # fmt: skip
    assert set(stock._get_extended_properties(request(), "tb")) == {
        "periodic_task_name", "task_args", "task_kwargs", "task_name", "traceback", "worker",
    }  # fmt: skip
    assert stock._get_meta_from_request(request(meta={"m": 1})) == {"m": 1}
    content_type, content_encoding, _ = stock.encode_content({"n": 1})
    assert (content_type, content_encoding) == ("application/json", "utf-8")
    assert parameters(DatabaseBackend._store_result) == parameters(JobResultBackend._store_result)


def test_every_taskmodel_attribute_the_stock_backend_uses_exists_on_jobsites():
    """DatabaseBackend reaches TaskModel.X and TaskModel._default_manager.Y: both must exist."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(DatabaseBackend)))
    used, manager_used = set(), set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if isinstance(owner, ast.Attribute) and owner.attr == "TaskModel":
            used.add(node.attr)
        if (
            isinstance(owner, ast.Attribute)
            and owner.attr == "_default_manager"
            and isinstance(owner.value, ast.Attribute)
            and owner.value.attr == "TaskModel"
        ):
            manager_used.add(node.attr)

    assert used >= {"_default_manager", "DoesNotExist"}
    for name in used:
        assert hasattr(JobResultBackend.TaskModel, name), name
    for name in manager_used:
        assert hasattr(JobResultBackend.TaskModel._default_manager, name), name
    assert JobResultBackend.TaskModel._default_manager.model is TaskResult


# --- Workarounds, and whether they are still needed ----------------------------------------


def test_the_stock_backend_still_does_not_retry_a_django_operational_error(app):
    """exception_safe_to_retry: with psycopg 3 a killed connection raises OperationalError.

    If this fails, django-celery-results recognises it now: Jobsite's override is droppable.
    """
    assert DatabaseBackend(app=app).exception_safe_to_retry(OperationalError("gone")) is False


@pytest.mark.django_db
def test_the_stock_backend_still_drops_a_chord_part_whose_counter_is_not_committed(app, caplog):
    """on_chord_part_return: why JobResultBackend waits for the ChordCounter.

    If this fails, django-celery-results waits (or retries) itself: the wait is droppable.
    """
    part = SimpleNamespace(id="part-1", group="group-without-counter")

    with caplog.at_level(logging.WARNING):
        returned = DatabaseBackend(app=app).on_chord_part_return(part, "SUCCESS", 1)

    assert returned is None
    assert "Can't find ChordCounter" in caplog.text
    assert parameters(DatabaseBackend.on_chord_part_return) == [
        "self", "request", "state", "result", "kwargs",
    ]  # fmt: skip


# --- The admin (jobs.admin.records) ---------------------------------------------------------


def test_jobsites_result_admins_replace_the_ones_django_celery_results_registers():
    assert isinstance(admin.site.get_model_admin(TaskResult), FastTaskResultAdmin)
    assert isinstance(admin.site.get_model_admin(GroupResult), FastGroupResultAdmin)
    assert issubclass(FastTaskResultAdmin, results_admin.TaskResultAdmin)
    assert issubclass(FastGroupResultAdmin, results_admin.GroupResultAdmin)
    for name in ("date_hierarchy", "list_filter", "search_fields"):
        assert hasattr(results_admin.TaskResultAdmin, name), name
