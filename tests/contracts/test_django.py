"""Django 5.2 internals: the connection's health-check flag (jobs.worker.signals), the
raw delete (jobs.services.maintenance), Query.where and Paginator.count (jobs.admin)."""

from __future__ import annotations

import pytest
from django.core.paginator import Paginator
from django.db import connection
from django.db.models import QuerySet
from django.utils.functional import cached_property
from django_celery_results.models import TaskResult

from jobs.admin.paginators import EstimatedCountPaginator

from .conftest import parameters


@pytest.fixture
def usable_calls(monkeypatch) -> list[bool]:
    """Spy on the connection's health check (SELECT 1 on PostgreSQL), passing it through."""
    calls: list[bool] = []
    check = connection.is_usable

    def spy():
        calls.append(True)
        return check()

    monkeypatch.setattr(connection, "is_usable", spy)
    return calls


@pytest.mark.django_db(transaction=True)  # outside a transaction, as in the worker
def test_health_check_done_skips_the_health_check_until_close_old_connections(usable_calls):
    """jobs.worker.signals sets it for a connection used a moment ago: no SELECT 1 per run.

    It is set after close_old_connections(), which asks for a fresh check each time.
    """
    connection.ensure_connection()
    assert connection.health_check_enabled  # CONN_HEALTH_CHECKS
    assert connection.vendor == "postgresql"
    assert connection.connection.fileno() >= 0  # signals._closed_by_server selects on it

    connection.health_check_done = True
    connection.close_if_health_check_failed()
    assert usable_calls == []

    connection.close_if_unusable_or_obsolete()  # what close_old_connections() calls
    assert connection.connection is not None
    assert connection.health_check_done is False
    connection.close_if_health_check_failed()
    assert usable_calls == [True]
    assert connection.health_check_done is True  # once until the next reset


@pytest.mark.django_db
def test_raw_delete_deletes_the_rows_of_a_queryset_in_one_statement():
    for n in range(3):
        TaskResult.objects.create(task_id=f"raw-{n}", status="SUCCESS")
    doomed = TaskResult.objects.filter(task_id__in=["raw-0", "raw-1"])

    deleted = doomed._raw_delete(TaskResult.objects.db)

    assert deleted == 2
    assert list(TaskResult.objects.values_list("task_id", flat=True)) == ["raw-2"]
    assert parameters(QuerySet._raw_delete) == ["self", "using"]


def test_a_querysets_where_says_whether_it_is_filtered():
    assert not TaskResult.objects.all().query.where
    assert not TaskResult.objects.order_by("-date_done").query.where
    assert TaskResult.objects.filter(status="SUCCESS").query.where


def test_paginator_count_is_a_cached_property_the_estimate_replaces():
    assert isinstance(vars(Paginator)["count"], cached_property)
    assert isinstance(vars(EstimatedCountPaginator)["count"], cached_property)
    assert Paginator(TaskResult.objects.none(), 10).object_list is not None
