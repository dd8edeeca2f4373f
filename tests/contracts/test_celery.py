"""Celery 5.7.0 internals that jobs/worker, jobs/beat and jobs/workflows.py depend on.

Each test names, in docs/internals.md, the override it protects.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from celery import Task, chain, chord, group
from celery.app.task import Context
from celery.app.trace import build_tracer, fast_trace_task, trace_ok_t, trace_task_ret
from celery.backends.base import BaseBackend
from celery.beat import ScheduleEntry, Scheduler, event_t
from celery.canvas import _chain
from celery.concurrency import prefork
from celery.fixups.django import DjangoWorkerFixup
from celery.schedules import crontab, schedstate, schedule
from celery.utils.time import maybe_iso8601, maybe_make_aware
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from celery.worker.request import Request, create_request_cls
from kombu import Connection
from vine import promise

from jobs.beat.scheduler import JobsiteScheduler
from jobs.worker import commit
from jobs.worker.consumer import JobsiteConsumer

from .conftest import parameters, task_message

# --- The tracer and the result hand-off (jobs.worker.commit.wrap_tracers) -------------


def test_trace_ok_t_has_the_four_fields_wrap_tracers_rebuilds():
    assert trace_ok_t._fields == ("retval", "info", "runtime", "retstr")


def test_a_built_tracer_takes_the_arguments_wrap_tracers_passes_on(app):
    tracer = build_tracer("contracts.add", app.tasks["contracts.add"], app=app)

    assert parameters(tracer) == ["uuid", "args", "kwargs", "request"]


def test_a_built_tracer_returns_a_trace_ok_t_with_no_info_on_success(app):
    tracer = build_tracer("contracts.add", app.tasks["contracts.add"], app=app)

    traced = tracer("run-1", (2, 3), {}, {"id": "run-1"})

    assert isinstance(traced, trace_ok_t)
    assert traced.retval == 5
    assert traced.info is None  # what wrap_tracers reads as "succeeded"
    assert traced.retstr == "5"  # the text the main process gets


def test_a_failed_run_comes_back_with_info(app):
    tracer = build_tracer("contracts.add", app.tasks["contracts.add"], app=app)

    traced = tracer("run-1", (2, None), {}, {"id": "run-1"})

    assert traced.info is not None


@pytest.mark.parametrize("trace", [trace_task_ret, fast_trace_task])
def test_the_pool_process_sends_the_tracers_text_object_itself(app, trace):
    """The main process's on_success gets (0, retstr, runtime): the very object."""
    task = app.tasks["contracts.add"]
    text = commit.DeferredResult("5")
    text.value = 5
    task.__trace__ = lambda uuid, args, kwargs, request=None, **_: trace_ok_t(5, None, 0.1, text)
    message = task_message(app, "contracts.add", args=(2, 3))
    request = dict(message.headers)
    extra = {"_loc": [app.tasks, {"application/json"}, "host"]} if trace is fast_trace_task else {}

    result = trace(
        "contracts.add", "run-1", request, message.body,
        message.content_type, message.content_encoding, app=app, **extra,
    )  # fmt: skip

    assert result[0] == 0
    assert result[1] is text
    assert result[2] == 0.1


def test_a_deferred_result_crosses_the_pool_pipe_with_its_value():
    # billiard pickles what a pool process returns.
    text = commit.DeferredResult("{'n': 1}")
    text.value = {"n": 1}

    copy = pickle.loads(pickle.dumps(text))  # noqa: S301 - our own bytes

    assert copy == "{'n': 1}"
    assert copy.value == {"n": 1}


def test_pool_processes_have_their_tracers_before_worker_process_init():
    """wrap_tracers runs at worker_process_init and wraps the tracers built before it."""
    script = textwrap.dedent(
        """
        from celery import Celery, signals
        from celery.concurrency.prefork import process_initializer

        app = Celery("probe", set_as_current=False, broker="memory://")

        @app.task(name="probe.t")
        def t():
            return 1

        seen = {}

        @signals.worker_process_init.connect
        def check(**kwargs):
            seen["built"] = app.tasks["probe.t"].__trace__ is not None

        process_initializer(app, "probe@host")
        print("BUILT" if seen.get("built") else "NOT BUILT")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}

    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )

    assert done.stdout.strip() == "BUILT", done.stderr


def test_the_tracer_calls_a_task_class_own___call__(app):
    """JobTask's cancel check and guard live in __call__: Celery must not skip it."""
    calls = []

    class Checked(Task):
        def __call__(self, *args, **kwargs):
            calls.append(self.request.id)
            return super().__call__(*args, **kwargs)

    @app.task(name="contracts.checked", base=Checked, shared=False)
    def checked():
        return "ok"

    task = checked
    tracer = build_tracer(task.name, task, app=app)

    tracer("run-1", (), {}, {"id": "run-1"})

    assert calls == ["run-1"]


def test_request_dict_keys_reach_the_running_task_as_attributes(app):
    """jobsite_defer / jobsite_received_at travel in the request dict to the pool process."""
    seen = {}

    @app.task(name="contracts.reader", bind=True, shared=False)
    def reader(self):
        seen["defer"] = getattr(self.request, "jobsite_defer", None)
        seen["received"] = getattr(self.request, "jobsite_received_at", None)

    tracer = build_tracer(reader.name, reader, app=app)

    tracer("run-1", (), {}, {"id": "run-1", "jobsite_defer": True, "jobsite_received_at": 1.5})

    assert seen == {"defer": True, "received": 1.5}
    assert Context({"id": "x", "jobsite_defer": True}).jobsite_defer is True


# --- The request (jobs.worker.commit.JobRequest) -------------------------------------


def test_the_request_keeps_its_headers_and_payload_where_job_request_reads_them(app):
    message = task_message(app, "contracts.add", args=(2, 3), jobsite_max_retries=3)
    request = Request(message, app=app, task=app.tasks["contracts.add"])

    assert request._request_dict is request.request_dict
    assert request._request_dict["jobsite_max_retries"] == 3
    args, kwargs, embed = request._payload
    assert (args, kwargs) == ([2, 3], {})
    assert set(embed) == {"callbacks", "errbacks", "chain", "chord"}
    assert request.type == "contracts.add"


def test_the_per_task_request_class_has_its_own_on_success(app):
    task = app.tasks["contracts.late"]
    pool = SimpleNamespace(apply_async=None)

    cls = create_request_cls(Request, task, pool, "host", None, app=app)

    assert issubclass(cls, Request)
    assert "on_success" in vars(cls)  # why JobRequest sets an instance attribute
    assert parameters(cls.on_success) == ["self", "failed__retval__runtime", "kwargs"]
    assert parameters(Request.on_success) == ["self", "failed__retval__runtime", "kwargs"]


def test_job_request_defers_the_ack_of_a_group_committed_run(app, monkeypatch):
    """The whole hand-off on Celery's own per-task request class, with no pool and no broker."""
    added = []
    monkeypatch.setattr(commit, "_committer", SimpleNamespace(accepting=True, add=added.append))
    task = app.tasks["contracts.late"]
    sent = {}
    pool = SimpleNamespace(apply_async=lambda trace, **kwargs: sent.update(kwargs))
    acks = []
    cls = create_request_cls(commit.JobRequest, task, pool, "host", None, app=app)
    message = task_message(app, "contracts.late", jobsite_max_retries=0)
    request = cls(message, on_ack=lambda *args: acks.append(args), app=app, task=task)

    request.execute_using_pool(pool)
    text = commit.DeferredResult("'done'")
    text.value = "done"
    sent["callback"]((0, text, 0.01))

    assert sent["args"][2]["jobsite_defer"] is True  # the pool process is told
    assert len(added) == 1 and added[0][0] is request and added[0][1] == "done"
    assert acks == []  # the committer acknowledges, once stored
    Request.acknowledge(request)
    assert acks == [(logging.getLogger("celery.worker.request"), request.connection_errors)]


def test_the_request_records_its_start_in_wall_clock_seconds(app):
    """commit._item takes time_start + runtime as the run's finish time (epoch seconds)."""
    task = app.tasks["contracts.late"]  # acks_late: accepting it acknowledges nothing
    request = Request(task_message(app, "contracts.late"), app=app, task=task)
    assert request.time_start is None

    request.on_accepted(pid=1, time_accepted=time.monotonic())
    worker_state.task_ready(request)

    assert request.time_start > 1_000_000_000  # seconds since 1970, not the monotonic clock
    assert request.message.channel is None  # acknowledge_stored groups by message.channel


def test_acknowledge_hands_the_logger_and_connection_errors_to_on_ack(app):
    acks = []
    message = task_message(app, "contracts.add", args=(1, 1))
    request = Request(message, on_ack=lambda *args: acks.append(args), app=app)

    request.acknowledge()
    request.acknowledge()

    assert len(acks) == 1 and len(acks[0]) == 2  # safe_ack(log, errors)
    assert request.acknowledged


# --- The consumer (jobs.worker.consumer.JobsiteConsumer) -----------------------------


# What each overridden Consumer method takes upstream (JobsiteConsumer's own takes the
# same, or passes *args/**kwargs through).
OVERRIDDEN = {
    "create_task_handler": ["self", "promise"],
    "call_soon_ack": ["self", "p", "args", "kwargs"],
    "stop": ["self"],
    "shutdown": ["self"],
    "on_decode_error": ["self", "message", "exc"],
    "on_unknown_message": ["self", "body", "message"],
    "on_unknown_task": ["self", "body", "message", "exc"],
    "on_invalid_task": ["self", "body", "message", "exc"],
    "on_connection_error_after_connected": ["self", "exc"],
}


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_consumer_methods_jobsite_overrides_keep_their_parameters(name):
    ours = getattr(JobsiteConsumer, name)
    theirs = getattr(Consumer, name)

    assert ours is not theirs  # still overridden
    assert parameters(theirs) == OVERRIDDEN[name]
    assert parameters(ours) in (OVERRIDDEN[name], ["self", "args", "kwargs"])


def test_the_task_handler_reads_message_ack_log_error_when_the_message_arrives():
    """JobsiteConsumer replaces message.ack_log_error before Celery's handler runs."""
    queued = []
    strategy_calls = []

    def strategy(message, payload, ack, reject, callbacks):
        strategy_calls.append(ack)

    consumer = SimpleNamespace(
        strategies={"contracts.add": strategy},
        on_unknown_message=None, on_unknown_task=None, on_invalid_task=None,
        on_task_message=set(), on_decode_error=None,
        call_soon_ack=lambda p, *args, **kwargs: queued.append((p, args)),
        _restore_prefetch_count_after_connection_restart=None,
        _maximum_prefetch_restored=True, restart_count=0,
    )  # fmt: skip
    handler = Consumer.create_task_handler(consumer, promise=promise)
    message = SimpleNamespace(headers={"task": "contracts.add"})
    replaced = object()
    message.ack_log_error = replaced
    message.reject_log_error = object()

    handler(message)
    strategy_calls[0]("logger", ("errors",))

    assert queued == [(replaced, ("logger", ("errors",)))]


def test_the_pools_shutdown_ack_runner_recognises_only_kombus_own_ack_methods(app):
    """Celery 5.7 runs queued acks during the pool's join only if they are kombu's methods."""
    message = task_message(app, "contracts.add", args=(1, 1))
    stock = promise(message.ack_log_error, ("logger", ()))
    other = promise(lambda *args: None, ("logger", ()))

    assert prefork._is_ack_callback(stock)
    assert not prefork._is_ack_callback(other)


def test_jobsites_wrapped_ack_is_recognised_by_the_pools_shutdown_ack_runner(app):
    message = task_message(app, "contracts.add", args=(1, 1))
    safe_ack = JobsiteConsumer._safe_ack(SimpleNamespace(), message, "run-1")

    assert prefork._is_ack_callback(promise(safe_ack, ("logger", ())))


def test_a_connection_error_closes_the_connection_through_its_instance_attribute():
    """JobsiteConsumer wraps connection.close; Celery must call it through the instance."""
    connection = Connection("memory://")
    closed = []
    connection.close = lambda: closed.append(True)
    consumer = SimpleNamespace(
        connection=connection,
        app=SimpleNamespace(conf=SimpleNamespace(
            worker_cancel_long_running_tasks_on_connection_loss=True,
            worker_enable_prefetch_count_reduction=False,
        )),
    )  # fmt: skip

    Consumer.on_connection_error_after_connected(consumer, OSError("gone"))

    assert closed == [True]
    assert consumer.connection is None


# --- The result backend's retry (JobResultBackend.exception_safe_to_retry) ------------


def test_store_result_retries_what_exception_safe_to_retry_accepts(app):
    attempts = []

    class Flaky(BaseBackend):
        def _store_result(self, task_id, result, state, traceback=None, request=None, **kw):
            attempts.append(task_id)
            if len(attempts) == 1:
                raise ConnectionResetError("dropped")
            return result

        def exception_safe_to_retry(self, exc):
            return isinstance(exc, ConnectionResetError)

    app.conf.result_backend_always_retry = True
    app.conf.result_backend_base_sleep_between_retries_ms = 1
    backend = Flaky(app=app)

    backend.store_result("run-1", 1, "SUCCESS")

    assert attempts == ["run-1", "run-1"]


def test_store_result_calls__store_result_with_the_arguments_jobsite_accepts(app):
    from jobs.worker.backend import JobResultBackend

    seen = {}

    class Recording(BaseBackend):
        def _store_result(self, task_id, result, status, traceback=None, request=None, **kw):
            seen.update(task_id=task_id, status=status, request=request, extra=kw)

    Recording(app=app).store_result("run-1", 1, "SUCCESS", request=None)

    assert seen["extra"] == {}  # JobResultBackend._store_result takes no **kwargs
    assert parameters(JobResultBackend._store_result) == [
        "self", "task_id", "result", "status", "traceback", "request", "using",
    ]  # fmt: skip


# --- The Django fix-up (CELERY_DB_REUSE_MAX) ------------------------------------------


def test_the_django_fixup_reuses_the_connection_as_celery_db_reuse_max_says(app):
    app.conf.CELERY_DB_REUSE_MAX = 3
    fixup = DjangoWorkerFixup(app)
    closed = []
    fixup._close_database = lambda: closed.append(True)

    for _ in range(6):
        fixup.close_database()

    assert fixup.db_reuse_max == 3
    assert closed == []  # kept across six tasks
    fixup.close_database()
    assert closed == [True]  # then renewed


# --- Canvas (jobs.workflows.link_error) -----------------------------------------------


def test_chain_of_several_signatures_is_a__chain_not_a_chain(app):
    add = app.tasks["contracts.add"]

    several = chain(add.s(1, 1), add.s(2))
    single = chain(add.s(1, 1))

    assert type(several) is _chain and not isinstance(several, chain)
    assert isinstance(single, _chain)  # chain subclasses _chain: one isinstance covers both
    assert [t.task for t in several.tasks] == ["contracts.add", "contracts.add"]
    built = chord(group(add.s(1, 1), add.s(2, 2)), add.s(3))
    assert built.body.task == "contracts.add" and len(built.tasks) == 2


# --- Beat (jobs.beat.scheduler.JobsiteScheduler) --------------------------------------


def test_beat_tuples_have_the_layout_jobsite_builds():
    assert event_t._fields == ("time", "priority", "entry")
    assert schedstate._fields == ("is_due", "next")


def test_scheduler_private_helpers_populate_heap_uses_exist(app):
    scheduler = Scheduler(app, lazy=True)
    entry = ScheduleEntry("e", "contracts.add", schedule=schedule(60), app=app)

    assert scheduler._is_due_failed(entry) == (False, scheduler.max_interval)
    assert isinstance(scheduler._when(entry, 5), float)
    assert parameters(Scheduler.populate_heap) == ["self", "event_t", "heapify"]
    assert parameters(JobsiteScheduler.populate_heap) == parameters(Scheduler.populate_heap)


def test_celerys_populate_heap_asks_the_entry_not_the_scheduler(app):
    """Why JobsiteScheduler copies populate_heap: Celery's skips an overridden is_due."""

    class Asking(Scheduler):
        def is_due(self, entry):
            return schedstate(True, 0)

    entry = ScheduleEntry(
        "e", "contracts.add", schedule=schedule(3600), app=app, last_run_at=datetime.now(UTC)
    )
    scheduler = Asking(app, lazy=True)
    scheduler.data = {"e": entry}

    scheduler.populate_heap()

    (event,) = scheduler._heap
    assert event.time > scheduler._when(entry, 0) + 3000  # the entry's wait, not "due"


def test_tick_asks_is_due_then_reserve_then_apply_entry(app):
    calls = []

    class Recording(Scheduler):
        def is_due(self, entry):
            calls.append("is_due")
            return super().is_due(entry)

        def reserve(self, entry):
            calls.append("reserve")
            return super().reserve(entry)

        def apply_entry(self, entry, producer=None):
            calls.append("apply_entry")

        @property
        def producer(self):
            return None

    due = datetime.now(UTC) - timedelta(hours=2)
    entry = ScheduleEntry("e", "contracts.add", schedule=schedule(60), app=app, last_run_at=due)
    scheduler = Recording(app, lazy=True)
    scheduler.data = {"e": entry}

    scheduler.tick()

    assert calls[-3:] == ["is_due", "reserve", "apply_entry"]
    assert parameters(Scheduler.apply_entry) == ["self", "entry", "producer"]
    assert parameters(Scheduler.apply_async) == ["self", "entry", "producer", "advance", "kwargs"]


@pytest.mark.parametrize(
    "make",
    [lambda: schedule(timedelta(minutes=5)), lambda: crontab(minute="*/5")],
    ids=["interval", "crontab"],
)
def test_a_schedules_nowfun_is_the_clock_remaining_estimate_reads(app, make):
    sched = make()
    sched.app = app
    frozen = datetime(2030, 1, 1, 12, 1, 0, tzinfo=UTC)
    last = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)

    sched.nowfun = lambda: frozen

    assert sched.now() == frozen
    assert frozen + sched.remaining_estimate(last) == datetime(2030, 1, 1, 12, 5, tzinfo=UTC)


def test_the_time_helpers_tracking_and_beat_use_keep_their_behaviour():
    assert maybe_iso8601(None) is None
    assert maybe_iso8601("2030-01-01T12:00:00+00:00") == datetime(2030, 1, 1, 12, tzinfo=UTC)
    aware = maybe_make_aware(datetime(2030, 1, 1, 12))  # naive counts as UTC
    assert aware.utcoffset() == timedelta(0)


def test_value_set_for_sees_a_namespaced_setting_and_add_defaults_hides_it():
    """Entry 43: why install() applies its values after configuration, not as defaults."""
    from celery import Celery

    class Config:
        CELERY_ACCEPT_CONTENT = ["msgpack", "json"]

    app = Celery("contract", set_as_current=False)
    app.config_from_object(Config, namespace="CELERY")
    seen = {}
    app.on_after_configure.connect(
        lambda sender, source, **kw: seen.update(set=source.value_set_for("accept_content")),
        weak=False,
    )
    app.add_defaults({"accept_content": ["json"]})
    assert app.configured is False
    assert app.conf.accept_content == ["json"]  # the "default" hid the project's setting
    assert app.configured is True
    assert seen == {"set": True}  # value_set_for found CELERY_ACCEPT_CONTENT
    assert app.conf.value_set_for("result_backend") is False


def test_settings_table_filters_through_the_module_filter_and_misses_namespaced_urls():
    """Entry 45: why jobs.celery wraps celery.app.utils.filter_hidden_settings."""
    from celery import Celery
    from celery.app import utils as celery_app_utils

    class Config:
        CELERY_BROKER_URL = "redis://user:contract-pw@127.0.0.1:6379/0"

    app = Celery("contract", set_as_current=False)
    app.config_from_object(Config, namespace="CELERY")
    original = getattr(celery_app_utils.filter_hidden_settings, "__wrapped__", None)
    celery_filter = original or celery_app_utils.filter_hidden_settings
    # Celery's own filter leaves the namespaced broker URL as it is ...
    assert celery_filter(app.conf.table(censored=False))["CELERY_BROKER_URL"].endswith(
        ":contract-pw@127.0.0.1:6379/0"
    )
    calls = []
    saved = celery_app_utils.filter_hidden_settings
    celery_app_utils.filter_hidden_settings = lambda conf: calls.append(conf) or conf
    try:
        app.conf.table(censored=True)  # ... and table() finds the filter as a module global
    finally:
        celery_app_utils.filter_hidden_settings = saved
    assert len(calls) == 1


def test__ensure_retryable_calls_again_what_exception_safe_to_retry_accepts_then_gives_up(app):
    class Dropping(BaseBackend):
        def exception_safe_to_retry(self, exc):
            return isinstance(exc, ConnectionResetError)

    app.conf.result_backend_always_retry = True
    app.conf.result_backend_max_retries = 2
    app.conf.result_backend_base_sleep_between_retries_ms = 1
    backend = Dropping(app=app)
    calls = []

    def write(run_id, fail_times):
        calls.append(run_id)
        if len(calls) <= fail_times:
            raise ConnectionResetError("dropped")
        return "stored"

    assert backend._ensure_retryable(write, "run-1", 2) == "stored"
    assert calls == ["run-1"] * 3
    calls.clear()
    with pytest.raises(ConnectionResetError):
        backend._ensure_retryable(write, "run-2", 3)  # a third retry is one too many
    calls.clear()
    with pytest.raises(ValueError):
        backend._ensure_retryable(lambda: (calls.append(1), int("x")))  # not retryable
    assert calls == [1]
