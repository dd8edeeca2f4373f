"""A paginator for admin lists over millions of rows: never a full COUNT(*)."""

from __future__ import annotations

from typing import Any

from django.core.paginator import Paginator
from django.db import connection
from django.db.models import QuerySet
from django.utils.functional import cached_property


class EstimatedCountPaginator(Paginator):
    """Counts exactly up to CAP rows (a bounded subquery), and estimates beyond.

    Past CAP, an unfiltered list reports PostgreSQL's planner estimate
    (pg_class.reltuples, kept by autovacuum); a filtered one reports CAP + 1, so its
    pages stop there — use a narrower filter, or the history page, to go further.
    """

    CAP = 10_000
    object_list: QuerySet[Any]  # the admin changelist always pages a queryset

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        exact = queryset.order_by()[: self.CAP + 1].count()
        if exact <= self.CAP:
            return exact
        estimate = None if queryset.query.where else estimated_rows(queryset.model)
        return max(estimate or 0, exact)


def estimated_rows(model) -> int | None:
    """The planner's row estimate of a table (PostgreSQL only; None if unknown)."""
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
            [model._meta.db_table],
        )
        row = cursor.fetchone()
    return int(row[0]) if row and row[0] > 0 else None
