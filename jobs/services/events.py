"""Runs seen through Celery task events, stored in the same history as Jobsite's own.

A worker that is not Jobsite's (another codebase on the same broker, started with
``-E``) tells of its runs only through events. The recorder (``manage.py
record_events``, jobs.events) hands them here in batches: ``events_store`` folds a
batch into one row per run and writes the batch in one statement that inserts new runs
and merges into known ones.

The merge never moves a run backwards, whatever order the events come in, and an event
applied twice changes nothing:

- a final state (SUCCESS, FAILURE, REVOKED) stays: a late STARTED or RECEIVED never
  overwrites it, nor its result, error or finish time;
- otherwise the state of the newest event wins, by the event's own timestamp
  (``Job.event_clock``);
- times are first-seen (sent, received, started, finished), counters take the largest.

Only rows the recorder created (source *events*) are merged into: a run Jobsite submitted
or its own worker records is never touched, and events from Jobsite's own workers (known
by their heartbeat) are not stored at all.
"""

from __future__ import annotations

import ast
import logging
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from jobs import heartbeat, specs
from jobs.models import AuditAction, Job, JobSource, JobState, JobType
from jobs.redis import client
from jobs.services.audit import audit_record

logger = logging.getLogger(__name__)

TASK_STATES = {
    "task-sent": JobState.PENDING,
    "task-received": JobState.RECEIVED,
    "task-started": JobState.STARTED,
    "task-retried": JobState.RETRY,
    "task-succeeded": JobState.SUCCESS,
    "task-failed": JobState.FAILURE,
    "task-revoked": JobState.REVOKED,
    "task-rejected": JobState.FAILURE,  # not requeued: the message is dropped (below)
}
FINAL = (JobState.SUCCESS, JobState.FAILURE, JobState.REVOKED)
# Keys whose values are masked in runs of tasks the catalogue does not know.
SECRET_KEY = re.compile(r"pass|secret|token|api_?key|credential", re.IGNORECASE)
MAX_REPR = 10_000  # characters of an argument, result or traceback kept


def _clock(event: dict) -> float | None:
    try:
        value = float(event.get("timestamp"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if 0 < value < 1e11 else None


def _when(timestamp) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(timestamp), tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


EMPTY: dict[str, object] = {"()": (), "[]": [], "{}": {}}


def _literal(text):
    """The value a repr stands for, when it is a plain literal (else None)."""
    if text in EMPTY:
        return EMPTY[text]
    if not isinstance(text, str) or len(text) > MAX_REPR:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def event_params(task_name: str, args, kwargs) -> dict:
    """A run's parameters as the event carries them (reprs), masked.

    A catalogued task is masked as its job type says; any other task's keyword arguments
    whose names look secret are masked too. Arguments that do not read back as literals
    are kept as their repr, except for a catalogued task with secret fields: unreadable
    arguments of those are not kept at all.
    """
    spec = specs.by_task_name(task_name) if task_name else None
    params: dict = {}
    values = _literal(kwargs) if isinstance(kwargs, str) else kwargs
    if isinstance(values, dict):
        params.update({str(k): v for k, v in values.items()})
    elif kwargs not in (None, "", "{}"):
        if spec and spec.secret_fields:
            params["_kwargs"] = "(not kept: the job type has secret parameters)"
        else:
            params["_kwargs"] = str(kwargs)[:MAX_REPR]
    positional = _literal(args) if isinstance(args, str) else args
    if isinstance(positional, list | tuple):
        if positional:
            params["_args"] = list(positional)
    elif args not in (None, "", "()", "[]"):
        if spec and spec.secret_fields:
            params["_args"] = "(not kept: the job type has secret parameters)"
        else:
            params["_args"] = str(args)[:MAX_REPR]
    if spec:
        return spec.mask(params)
    return {
        k: (specs.MASK if SECRET_KEY.search(k) and v not in ("", None) else v)
        for k, v in params.items()
    }


def _exception_type(text: str) -> str:
    head = text.split("(", 1)[0].strip()
    return head[:255] if re.fullmatch(r"[\w.]+", head or "-") else ""


def fold(events: Iterable[dict]) -> dict[str, dict]:
    """One row's fields per run id from a batch of task events (any order)."""
    rows: dict[str, dict] = {}
    for event in sorted(events, key=lambda e: _clock(e) or 0.0):
        kind = event.get("type", "")
        task_id = event.get("uuid")
        state = TASK_STATES.get(kind)
        if not task_id or state is None or not isinstance(task_id, str) or len(task_id) > 255:
            continue
        if kind == "task-rejected" and event.get("requeue"):
            continue  # back in the queue: a worker will receive it again
        clock = _clock(event) or time.time()
        when = _when(clock) or timezone.now()
        row = rows.setdefault(
            task_id, {"id": task_id, "created_at": when, "retries": 0, "executions": 0}
        )
        if row.get("state") not in FINAL:  # a final state stays
            row["state"] = state
            if state in FINAL:
                row["finished_at"] = when
        row["clock"] = max(row.get("clock", clock), clock)  # the batch's newest event
        if event.get("name") and not row.get("task_name"):
            row["task_name"] = str(event["name"])[:200]
            row["params"] = event_params(row["task_name"], event.get("args"), event.get("kwargs"))
            row["parent_id"] = event.get("parent_id") or None
            root = event.get("root_id") or ""
            row["workflow_id"] = root if root != task_id else ""
            row["queue"] = str(event.get("queue") or event.get("routing_key") or "")[:100]
            row["eta"] = _parse_iso(event.get("eta"))
            row["expires_at"] = _parse_iso(event.get("expires"))
        if event.get("hostname") and kind != "task-sent":
            row["worker"] = str(event["hostname"])[:255]
        retries = event.get("retries")
        if isinstance(retries, int) and retries > row["retries"]:
            row["retries"] = min(retries, 32767)
        if kind == "task-sent":
            row.setdefault("sent_at", when)
        elif kind == "task-received":
            row.setdefault("received_at", when)
        elif kind == "task-started":
            row.setdefault("started_at", when)
            row["executions"] = max(row["executions"], row["retries"] + 1)
        elif kind == "task-retried":
            # The worker says so once the attempt is over, which can be after the retry
            # ran and succeeded: then its error is not the run's. (Its received event
            # says how many retries.)
            if row.get("state") not in FINAL:
                _error(row, event)
        elif kind == "task-succeeded":
            result = event.get("result")
            row["result"] = None if result is None else str(result)[:MAX_REPR]
            # A retry's error is not the run's: it succeeded.
            row["error_message"] = row["exception_type"] = row["traceback"] = ""
        elif kind == "task-failed":
            if row.get("state") == JobState.FAILURE:
                _error(row, event)
        elif kind == "task-revoked":
            why = (
                "expired"
                if event.get("expired")
                else "terminated"
                if event.get("terminated")
                else "revoked"
            )
            row.setdefault("error_message", f"Cancelled ({why}), as the worker's event says.")
        elif kind == "task-rejected":
            row.setdefault("error_message", "Rejected by the worker and not requeued.")
    return rows


# "ValueError('card declined')", as Celery's events carry an exception: its repr.
EXCEPTION_REPR = re.compile(r"^(?P<type>[\w.]+)\((?P<q>['\"])(?P<message>.*)(?P=q),?\)$", re.DOTALL)


def _error(row: dict, event: dict) -> None:
    text = str(event.get("exception") or "")[:MAX_REPR]
    plain = EXCEPTION_REPR.match(text)
    row["error_message"] = plain["message"] if plain else text
    row["exception_type"] = _exception_type(text)
    row["traceback"] = str(event.get("traceback") or "")[:MAX_REPR]


def _parse_iso(value) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- Which workers are Jobsite's ----------------------------------------------------

_OWN_CACHE: dict[str, tuple[bool, float]] = {}
OWN_CACHE_SECONDS = 30.0


def is_jobsite_worker(hostname: str, now: float) -> bool:
    """Whether a worker of this name is one of Jobsite's (it sends Jobsite heartbeats)."""
    known = _OWN_CACHE.get(hostname)
    if known and now - known[1] < OWN_CACHE_SECONDS:
        return known[0]
    try:
        own = client().zscore(heartbeat.WORKERS_KEY, hostname) is not None
    except Exception:  # Redis down: store it (a Jobsite run's row is never merged into)
        own = False
    _OWN_CACHE[hostname] = (own, now)
    return own


def foreign_only(events: list[dict], now: float) -> list[dict]:
    """The events that do not come from Jobsite's own workers."""
    return [
        e for e in events if not (e.get("hostname") and is_jobsite_worker(str(e["hostname"]), now))
    ]


# --- The one statement --------------------------------------------------------------

COLUMNS_MERGED = {
    # column: how the stored value (j) and the batch's (e) combine
    "task_name": "CASE WHEN j.task_name = '' THEN e.task_name ELSE j.task_name END",
    "state": (
        "CASE WHEN j.state IN ({final}) THEN j.state WHEN e.state IN ({final}) THEN e.state "
        "WHEN j.event_clock IS NULL OR e.event_clock >= j.event_clock THEN e.state "
        "ELSE j.state END"
    ),
    "created_at": "CASE WHEN e.created_at < j.created_at THEN e.created_at ELSE j.created_at END",
    "sent_at": "COALESCE(j.sent_at, e.sent_at)",
    "received_at": "COALESCE(j.received_at, e.received_at)",
    "started_at": "COALESCE(j.started_at, e.started_at)",
    "finished_at": (
        "CASE WHEN j.state IN ({final}) THEN j.finished_at "
        "ELSE COALESCE(e.finished_at, j.finished_at) END"
    ),
    "worker": "CASE WHEN j.state IN ({final}) OR e.worker = '' THEN j.worker ELSE e.worker END",
    "retries": "CASE WHEN e.retries > j.retries THEN e.retries ELSE j.retries END",
    # Starts, retries included: the most either side counted, or, once it has started,
    # one more than its retries (a retry's events may come in another batch).
    "executions": (
        "CASE WHEN COALESCE(j.started_at, e.started_at) IS NOT NULL AND "
        "(CASE WHEN e.retries > j.retries THEN e.retries ELSE j.retries END) + 1 > "
        "(CASE WHEN e.executions > j.executions THEN e.executions ELSE j.executions END) "
        "THEN (CASE WHEN e.retries > j.retries THEN e.retries ELSE j.retries END) + 1 "
        "ELSE (CASE WHEN e.executions > j.executions THEN e.executions ELSE j.executions END) END"
    ),
    "result": "CASE WHEN j.state IN ({final}) THEN j.result ELSE COALESCE(e.result, j.result) END",
    # The error of the last failure or retry; none once it succeeded.
    **{
        name: (
            f"CASE WHEN j.state IN ({{final}}) THEN j.{name} "
            f"WHEN e.state = '{JobState.SUCCESS}' THEN '' "
            f"WHEN e.{name} = '' THEN j.{name} ELSE e.{name} END"
        )
        for name in ("exception_type", "error_message", "traceback")
    },
    # What the sent or received event says: filled once, with the task's name.
    **{
        name: f"CASE WHEN j.task_name = '' THEN e.{name} ELSE j.{name} END"
        for name in ("params", "parent_id", "workflow_id", "queue", "eta", "expires_at")
    },
    "event_clock": (
        "CASE WHEN j.event_clock IS NULL OR e.event_clock > j.event_clock "
        "THEN e.event_clock ELSE j.event_clock END"
    ),
}


def _statement(fields: list, rows: int) -> str:
    quote = connection.ops.quote_name
    table = quote(Job._meta.db_table)
    columns = [f.column for f in fields]
    final = ", ".join(f"'{s}'" for s in FINAL)
    values = ", ".join(["(" + ", ".join(["%s"] * len(columns)) + ")"] * rows)
    merged = ", ".join(
        f"{quote(column)} = "
        + COLUMNS_MERGED[column]
        .format(final=final)
        .replace("j.", f"{table}.")
        .replace("e.", "EXCLUDED.")
        for column in columns
        if column in COLUMNS_MERGED
    )
    # Only quoted names and constants go in the text; every value is a parameter.
    return (
        f"INSERT INTO {table} ({', '.join(quote(c) for c in columns)}) VALUES {values} "  # noqa: S608
        f"ON CONFLICT ({quote('id')}) DO UPDATE SET {merged} "
        f"WHERE {table}.{quote('source')} = '{JobSource.EVENTS}'"
    )


def events_store(events: list[dict]) -> int:
    """Store a batch of task events (one statement); returns how many runs it touched."""
    rows = fold(foreign_only(events, timezone.now().timestamp()))
    if not rows:
        return 0
    # A parent the history does not hold (its events came before the recorder ran) is
    # not a foreign key a run can point to.
    parents = {v["parent_id"] for v in rows.values() if v.get("parent_id")}
    known = set(Job.objects.filter(pk__in=parents).values_list("pk", flat=True)) if parents else ()
    catalogued = {
        values["id"]: spec.name
        for values in rows.values()
        if (spec := specs.by_task_name(values.get("task_name", "")))
    }
    type_ids = (
        dict(JobType.objects.filter(name__in=set(catalogued.values())).values_list("name", "pk"))
        if catalogued
        else {}
    )
    fields = list(Job._meta.concrete_fields)
    params: list = []
    for values in rows.values():
        job = Job(
            id=values["id"],
            task_name=values.get("task_name", ""),
            job_type_id=type_ids.get(catalogued.get(values["id"], "")),
            state=values["state"],
            source=JobSource.EVENTS,
            created_at=values["created_at"],
            sent_at=values.get("sent_at"),  # known only from a task-sent event
            received_at=values.get("received_at"),
            started_at=values.get("started_at"),
            finished_at=values.get("finished_at"),
            worker=values.get("worker", ""),
            retries=values["retries"],
            executions=values["executions"],
            params=values.get("params", {}),
            parent_id=values.get("parent_id") if values.get("parent_id") in known else None,
            workflow_id=values.get("workflow_id", ""),
            queue=values.get("queue", ""),
            eta=values.get("eta"),
            expires_at=values.get("expires_at"),
            result=values.get("result"),
            exception_type=values.get("exception_type", ""),
            error_message=values.get("error_message", ""),
            traceback=values.get("traceback", ""),
            event_clock=values["clock"],
        )
        params.extend(f.get_db_prep_save(getattr(job, f.attname), connection) for f in fields)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_statement(fields, len(rows)), params)
    return len(rows)


# --- Foreign workers that stop ------------------------------------------------------


def events_mark_silent_workers_lost(
    last_seen: dict[str, float], *, lost_after: int | None = None, now: float | None = None
) -> int:
    """Mark LOST the unfinished runs seen through events of workers gone silent.

    ``last_seen``: worker name -> the time of its last event (heartbeat or task), as the
    recorder heard them. A worker silent for ``lost_after`` seconds (JOBSITE_LOST_AFTER)
    has its received and started runs marked LOST; a later event of the run (delivered
    again elsewhere) brings it back, as for Jobsite's own runs.
    """
    lost_after = lost_after or settings.JOBSITE_LOST_AFTER
    now = timezone.now().timestamp() if now is None else now
    silent = sorted(name for name, seen in last_seen.items() if now - seen > lost_after)
    if not silent:
        return 0
    cutoff = datetime.fromtimestamp(now, tz=UTC) - timedelta(seconds=lost_after)
    count = Job.objects.filter(
        source=JobSource.EVENTS,
        worker__in=silent,
        state__in=[JobState.RECEIVED, JobState.STARTED, JobState.RETRY],
        created_at__lt=cutoff,
    ).update(
        state=JobState.LOST,
        finished_at=timezone.now(),
        error_message=f"Its worker sent no event for over {lost_after} s.",
    )
    if count:
        audit_record(
            actor=None,
            action=AuditAction.RUNS_LOST,
            target_type="worker",
            target_id=",".join(silent),
            details={"runs": count, "via": "events"},
        )
    for name in silent:
        last_seen.pop(name, None)
    return count
