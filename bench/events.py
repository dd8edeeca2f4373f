"""Jobsite's event recorder against Flower's in-memory state, on one real event stream.

    .venv/bin/python -m bench.events --broker both --tasks 35000

The stream is real: a plain Celery app (not Jobsite's; written to a temporary
directory, Celery's defaults but the broker) with a no-op task, N of its tasks
published with its worker stopped, then one worker started with ``-E --pool=prefork
--concurrency=2`` drains them. Each task makes three task events (received, started,
succeeded): 35,000 tasks are 105,000 task events, plus the worker's heartbeats. A
replay of captured events through EventDispatcher could go faster than a worker, but
it would measure a stream no worker sends: the goal is to keep up with real workers.

Two consumers listen to that stream at the same time, each its own process:

- the recorder, ``manage.py record_events`` (PostgreSQL; on RabbitMQ its durable
  queue, acknowledged after each batch; on Redis a subscription);
- Flower's in-memory state: ``celery.events.EventReceiver`` with handlers
  ``{"*": on_event}`` calling ``flower.events.EventsState(max_tasks_in_memory=10000)
  .event(event)`` (``python -m bench.events --flower-consumer``). Flower's own Events
  thread hands each event to its tornado loop first; calling it directly is, if
  anything, faster than Flower.

Before the worker starts, a probe event (a task-succeeded of a made-up id) must reach
both: the recorder's row and Flower's "probe seen" say each is subscribed. Figures,
from the events' own timestamps (one machine, one clock):

- stream: task events / (last event sent - first event sent), the worker's rate;
- events/s: task events a consumer applied / (when it had applied the last - first
  event sent); a consumer that keeps up shows the stream's rate;
- lag: when it had applied the last event - last event sent. The recorder has applied
  the stream once every run's final state is in the database (polled: first the last
  runs sent, by primary key, then a count);
- CPU: seconds the consumer process used from the probe to the end (the recorder's
  PostgreSQL backend beside it), and memory: VmHWM (peak) and VmRSS of the process at
  the end, from /proc/<pid>/status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

from bench import common

APP_NAME = "evbench"
TASK_NAME = f"{APP_NAME}.noop"
QUEUE = "bench-events"
PROBE = "evbench-probe-"
FOREIGN_APP = textwrap.dedent(
    f"""
    import os

    from celery import Celery

    app = Celery({APP_NAME!r}, broker=os.environ["CELERY_BROKER_URL"])
    app.conf.task_default_queue = {QUEUE!r}

    @app.task(ignore_result=True)
    def noop():
        return None
    """
)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq", "both"], default="both")
    parser.add_argument("--tasks", type=int, default=None, help="no-op tasks (35,000)")
    parser.add_argument("--fast", action="store_true", help="a smoke run: 300 tasks")
    parser.add_argument("--flower-consumer", metavar="BROKER_URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flower_consumer:
        flower_consumer(args.flower_consumer)
        return []
    tasks = args.tasks or (300 if args.fast else 35_000)
    common.django_setup()
    print(common.machine(), flush=True)
    from django.conf import settings

    print(f"JOBSITE_EVENTS_BATCH = {settings.JOBSITE_EVENTS_BATCH}, "
          f"JOBSITE_EVENTS_FLUSH_MS = {settings.JOBSITE_EVENTS_FLUSH_MS}", flush=True)  # fmt: skip
    brokers = ["redis", "rabbitmq"] if args.broker == "both" else [args.broker]
    results = [measure(broker, tasks) for broker in brokers]
    rows = []
    for r in results:
        rec, flo = r["recorder"], r["flower"]
        rows.append([r["broker"], "stream (worker's task events/s)", r["stream"], r["stream"], "-"])
        for label, key in (("events/s sustained", "rate"), ("lag after the last event (s)", "lag"),
                           ("CPU (s)", "cpu"), ("task events per CPU second", "per_cpu"),
                           ("peak RSS, VmHWM (MiB)", "hwm"),
                           ("RSS at the end, VmRSS (MiB)", "rss"),
                           ("task events applied", "events")):  # fmt: skip
            ratio = "-" if key == "lag" else _ratio(rec[key], flo[key])  # lags near 0: noise
            rows.append([r["broker"], label, rec[key], flo[key], ratio])
        if "backlog" in r:
            rows.append([r["broker"], "backlog drained, recorder started late (events/s)",
                         r["backlog"], "- (auto-delete queue)", "-"])  # fmt: skip
    common.table(
        f"Task events: {tasks:,} no-op tasks ({3 * tasks:,} task events), prefork -c 2",
        ["broker", "figure", "recorder", "Flower state", "recorder / Flower"],
        rows,
    )
    for r in results:
        print(f"{r['broker']}: {r['note']}", flush=True)
    return results


def _ratio(a, b):
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else "-"


# --- One broker ----------------------------------------------------------------------


def measure(broker: str, n: int) -> dict:
    url = common.BROKERS[broker]
    common.use_broker(url)
    app_dir = Path(tempfile.mkdtemp(prefix="jobsite-bench-events-"))
    (app_dir / f"{APP_NAME}.py").write_text(FOREIGN_APP)
    env = {**common.bench_env(url), "PYTHONPATH": str(app_dir)}
    env.pop("DJANGO_SETTINGS_MODULE")
    client = _client(app_dir, url)
    recorder = common.Process(
        [sys.executable, "manage.py", "record_events"], common.bench_env(url), "recorder"
    )
    flower = common.Process(
        [sys.executable, "-m", "bench.events", "--flower-consumer", url], env, "flower"
    )
    worker = common.Process(
        [sys.executable, "-m", "celery", "-A", APP_NAME, "worker", "-E", "--loglevel=INFO",
         "--pool=prefork", "--concurrency=2", f"--queues={QUEUE}", f"--hostname={APP_NAME}@%h",
         "--without-gossip", "--without-mingle"],
        env, "worker",
    )  # fmt: skip
    try:
        _reset_queues(client, broker)
        result = {
            "broker": broker,
            "tasks": n,
            **_side_by_side(client, n, recorder, flower, worker),
        }
        if broker == "rabbitmq":
            result["backlog"] = _backlog(client, n, recorder, worker)
        return result
    finally:
        worker.stop()
        flower.stop()
        recorder.stop()
        _reset_queues(client, broker)
        sys.modules.pop(APP_NAME, None)
        with contextlib.suppress(ValueError):
            sys.path.remove(str(app_dir))


def _side_by_side(client, n: int, recorder, flower, worker) -> dict:
    """Both consumers on the worker's live stream."""
    _forget_earlier_runs()
    ids = _publish(client, n)
    recorder.start("Event recorder ready.")
    flower.start("Flower consumer ready.")
    _probe(client, flower, recorder)
    cpu_before = {"recorder": _cpu(recorder.pid), "flower": _cpu(flower.pid)}
    backends = BackendCpu()
    worker.start(" ready.")
    rec = _wait_recorder(ids, [worker, recorder, flower], backends)
    flo = _wait_flower(flower, 3 * n, idle=10 if rec["done"] else 1)
    stream = _stream()
    backends.sample()
    figures = {
        "recorder": {**rec, **_memory(recorder.pid)},
        "flower": {**flo, **_memory(flower.pid)},
    }
    figures["recorder"]["cpu"] = _cpu(recorder.pid) - cpu_before["recorder"]
    figures["flower"]["cpu"] = _cpu(flower.pid) - cpu_before["flower"]
    pg_cpu = backends.total()
    worker.stop()
    flower.stop()
    recorder.stop()
    for side in figures.values():
        side["rate"] = side["events"] / (side["applied"] - stream["first"])
        side["lag"] = side["applied"] - stream["last"]
        side["per_cpu"] = side["events"] / side["cpu"] if side["cpu"] else float("nan")
    seconds = stream["last"] - stream["first"]
    note = (
        f"the worker ran {n:,} tasks in {seconds:.1f} s ({n / seconds:,.0f} tasks/s); "
        f"the recorder's PostgreSQL backend used {pg_cpu:.1f} s of CPU beside the "
        f"recorder's {figures['recorder']['cpu']:.1f} s; Flower consumer reconnects: "
        f"{figures['flower'].get('reconnects', 0)}"
    )
    if not (figures["recorder"]["done"] and figures["flower"]["done"]):
        note += "; INCOMPLETE: a consumer did not apply every event (see 'task events applied')"
    return {"stream": 3 * n / seconds, **figures, "note": note}


def _backlog(client, n: int, recorder: common.Process, worker: common.Process) -> float:
    """The recorder's own ceiling: N more tasks' events wait in its durable queue, then
    it starts and drains them (task events / time from ready to every run stored)."""
    from jobs.events.recorder import QUEUE_NAME

    _forget_earlier_runs()
    ids = _publish(client, n)
    try:
        worker.start(" ready.")
        deadline = time.monotonic() + 1800
        while _depth(client):
            if time.monotonic() > deadline or worker.process.poll() is not None:
                raise RuntimeError(f"the worker did not drain:\n{worker.output()}")
            time.sleep(0.2)
        time.sleep(3)  # the last prefetched tasks run, their events are flushed
        worker.stop()
        waiting = _depth(client, QUEUE_NAME)
        print(f"backlog: {waiting:,} event messages wait for the recorder", flush=True)
        ready_at = time.time() - (time.monotonic() - recorder.start("Event recorder ready."))
        rec = _wait_recorder(ids, [recorder], BackendCpu())
    finally:
        worker.stop()
        recorder.stop()
    if not rec["done"]:
        print("backlog: INCOMPLETE", flush=True)
    return rec["events"] / (rec["applied"] - ready_at)


def _client(app_dir: Path, url: str):
    """The plain app, imported in this process to publish its tasks."""
    os.environ["CELERY_BROKER_URL"] = url  # Celery reads it before the app's own broker
    sys.path.insert(0, str(app_dir))
    sys.modules.pop(APP_NAME, None)
    import importlib

    return importlib.import_module(APP_NAME)


def _forget_earlier_runs() -> None:
    from django.db import connection
    from django.db.models import Q

    from jobs.models import Job, JobSource

    Job.objects.filter(
        Q(task_name=TASK_NAME) | Q(id__startswith=PROBE), source=JobSource.EVENTS
    ).delete()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f'VACUUM ANALYZE "{Job._meta.db_table}"')


def _reset_queues(client, broker: str) -> None:
    """No task of an earlier run waiting, and no recorder queue holding old events."""
    from jobs.events.recorder import QUEUE_NAME

    with client.app.connection_for_write() as conn:
        queues = [QUEUE] + ([QUEUE_NAME] if broker == "rabbitmq" else [])
        for queue in queues:
            with contextlib.suppress(Exception):
                conn.default_channel.queue_delete(queue)


def _publish(client, n: int) -> list[str]:
    started = time.perf_counter()
    with client.app.producer_or_acquire() as producer:
        ids = [client.noop.apply_async(producer=producer).id for _ in range(n)]
    print(f"published {n:,} tasks at {n / (time.perf_counter() - started):,.0f}/s", flush=True)
    deadline = time.monotonic() + 30  # RabbitMQ counts the last ones a moment later
    while (depth := _depth(client)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    if depth != n:
        raise RuntimeError(f"expected {n} queued tasks, the broker holds {depth}")
    return ids


def _depth(client, queue: str = QUEUE) -> int:
    with client.app.connection_for_read() as conn:
        return conn.default_channel.queue_declare(queue, passive=True).message_count


def _probe(client, flower: common.Process, recorder: common.Process) -> None:
    """A positive signal that both consumers are subscribed before the stream starts."""
    from celery.events import EventDispatcher

    from jobs.models import Job

    probe = PROBE + uuid.uuid4().hex
    deadline = time.monotonic() + 30
    with client.app.connection_for_write() as conn:
        dispatcher = EventDispatcher(conn, hostname="evbench-probe@bench", enabled=True)
        try:
            while time.monotonic() < deadline:
                dispatcher.send("task-succeeded", uuid=probe, result="probe")
                time.sleep(0.5)
                if Job.objects.filter(pk=probe).exists() and "probe seen" in flower.output():
                    return
        finally:
            dispatcher.close()
    raise RuntimeError(f"the probe did not reach both:\n{recorder.output()}\n{flower.output()}")


# --- Waiting for each consumer ----------------------------------------------------------


def _wait_recorder(
    ids: list[str], processes: list[common.Process], backends: BackendCpu, timeout=1800
) -> dict:
    """When every run's final state is in the database (or the stream is over without it)."""
    from jobs.models import Job, JobSource, JobState

    done = Job.objects.filter(source=JobSource.EVENTS, task_name=TASK_NAME, state=JobState.SUCCESS)
    last = ids[-20:]
    deadline = time.monotonic() + timeout
    stalled_since, seen, changed_at, sampled = time.monotonic(), -1, time.time(), 0.0
    while time.monotonic() < deadline:
        for process in processes:
            if process.process.poll() is not None:
                raise RuntimeError(f"{process.name} died:\n{process.output()}")
        if time.monotonic() - sampled > 1:
            backends.sample()
            sampled = time.monotonic()
        # Cheap by primary key: the last runs sent are about the last to finish.
        if done.filter(pk__in=last).count() == len(last):
            now, count = time.time(), done.count()
            if count == len(ids):
                return {"done": True, "applied": now, "events": 3 * count}
            if count != seen:
                stalled_since, seen, changed_at = time.monotonic(), count, now
            elif time.monotonic() - stalled_since > 15:
                break  # nothing more comes: events were lost
            time.sleep(0.1)
        else:
            time.sleep(0.02)
    count = done.count()
    print(f"the recorder stored {count:,} of {len(ids):,} runs", flush=True)
    return {"done": False, "applied": changed_at, "events": 3 * count}


def _wait_flower(flower: common.Process, expect: int, *, idle: float) -> dict:
    """The Flower consumer's own report: when it applied the last task event."""
    deadline, last_change, last = time.monotonic() + 1800, time.monotonic(), None
    while time.monotonic() < deadline:
        report = _last_report(flower)
        if report and report["task_events"] >= expect:
            return {"done": True, "applied": report["applied_last"], "events": expect,
                    "reconnects": report["reconnects"]}  # fmt: skip
        if report != last:
            last, last_change = report, time.monotonic()
        elif time.monotonic() - last_change > idle:
            break
        time.sleep(0.1)
    report = last or {"task_events": 0, "applied_last": time.time(), "reconnects": 0}
    print(f"the Flower consumer applied {report['task_events']:,} of {expect:,}", flush=True)
    return {"done": False, "applied": report["applied_last"], "events": report["task_events"],
            "reconnects": report["reconnects"]}  # fmt: skip


def _last_report(flower: common.Process) -> dict | None:
    lines = [ln for ln in flower.output().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _stream() -> dict:
    """First and last task event sent, by their timestamps (what the rows hold)."""
    from django.db.models import Max, Min

    from jobs.models import Job, JobSource

    span = Job.objects.filter(source=JobSource.EVENTS, task_name=TASK_NAME).aggregate(
        first=Min("received_at"), last=Max("finished_at")
    )
    return {"first": span["first"].timestamp(), "last": span["last"].timestamp()}


# --- /proc --------------------------------------------------------------------------


def _memory(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    kib = {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS")}
    return {"hwm": kib["VmHWM"] / 1024, "rss": kib["VmRSS"] / 1024}


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process (0 when it is not there)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BackendCpu:
    """CPU seconds of the other PostgreSQL backends of this database: the recorder's.

    Sampled, because the recorder's connection is replaced after CONN_MAX_AGE (60 s);
    only the benchmark and the recorder use this database (a test's idle session adds
    nothing). The seconds a backend had before the first sample are not counted.
    """

    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.sample()

    def sample(self) -> None:
        from django.db import connection

        if connection.vendor != "postgresql":
            return
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
            for (pid,) in cursor.fetchall():
                cpu = _cpu(pid)
                self.first.setdefault(pid, cpu if not self.last else 0.0)
                self.last[pid] = max(self.last.get(pid, 0.0), cpu)

    def total(self) -> float:
        return sum(cpu - self.first[pid] for pid, cpu in self.last.items())


# --- The Flower side (its own process) -------------------------------------------------


def flower_consumer(url: str) -> None:
    """Flower's in-memory state fed by Celery's EventReceiver, as Flower's Events thread."""
    from celery import Celery
    from celery.events import EventReceiver
    from flower.events import EventsState

    app = Celery("flower-bench", broker=url)
    state = EventsState(max_tasks_in_memory=10000)
    figures = {"events": 0, "task_events": 0, "applied_last": 0.0, "reconnects": 0}

    def on_event(event: dict) -> None:
        state.event(event)
        figures["events"] += 1
        if event.get("type", "").startswith("task-"):
            if str(event.get("uuid", "")).startswith(PROBE):
                if not figures.get("probe"):
                    figures["probe"] = True
                    print("probe seen", flush=True)
                return
            figures["task_events"] += 1
            figures["applied_last"] = time.time()

    class Receiver(EventReceiver):
        def on_consume_ready(self, *args, **kwargs):
            super().on_consume_ready(*args, **kwargs)
            print("Flower consumer ready.", flush=True)

    def report() -> None:
        while True:  # once a second: the parent reads the last line
            print(json.dumps({k: v for k, v in figures.items() if k != "probe"}), flush=True)
            time.sleep(1)

    threading.Thread(target=report, daemon=True).start()
    while True:  # Flower's Events.run: capture, and reconnect when the broker drops it
        try:
            with app.connection() as conn:
                Receiver(conn, handlers={"*": on_event}, app=app).capture(
                    limit=None, timeout=None, wakeup=True
                )
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            figures["reconnects"] += 1
            print(f"reconnecting: {exc!r}", flush=True)
            time.sleep(1)


if __name__ == "__main__":
    main()
