"""Submit latency under concurrent clients, bulk submit rate, and memory, on real processes.

    .venv/bin/python -m bench.submit --clients 20 --seconds 15 --bulk 10000

Starts gunicorn (sync workers, --web-workers of them) on 127.0.0.1:--port and one
Celery worker (prefork, concurrency 2) on the broker, then, each phase for --seconds
with --clients threads (a new HTTP/1.1 connection per request, as gunicorn's sync
workers close them):

- GET /healthz — the floor: gunicorn + Django with no work (the baseline);
- the submit form (POST /submit/noop/, session cookie + CSRF token, answered by a 302);
- the API (POST /api/runs/, a bearer token, 201);
- bulk: --bulk runs through POST /api/runs/bulk/ in requests of 1,000, against the
  single API submit's rate measured just before.

Memory (psutil RSS, MiB): gunicorn (master + workers) and the Celery worker (main
process + pool children), idle before the load and the peak during it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import threading
import time
from urllib.parse import urlencode

from bench import common

NOOP = {"job_type": "noop", "options": {"queue": common.QUEUE}}
PATTERNS = {"csrf": re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--bulk", type=int, default=10_000)
    parser.add_argument("--web-workers", type=int, default=4)
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args(argv)
    url = common.BROKERS[args.broker]
    common.django_setup(url)
    print(common.machine(), flush=True)
    common.purge()
    user, secret = _credentials()
    web = common.Process(
        [sys.executable, "-m", "gunicorn", "jobsite.wsgi", "--bind", f"127.0.0.1:{args.port}",
         "--workers", str(args.web_workers), "--access-logfile", "-"],
        common.bench_env(url), "gunicorn",
    )  # fmt: skip
    worker = common.worker(url)
    web.start("Booting worker")
    worker.start(" ready.")
    try:
        return _run(args, web, worker, user, secret)
    finally:
        web.stop()
        worker.stop()
        common.purge()
        _forget_runs()


def _run(args, web, worker, user, secret) -> dict:
    http_ = Http(args.port)
    http_.wait_ready()
    cookies = http_.login(user.username, "bench-pass")
    memory = Memory({"web (gunicorn)": web.pid, "worker (celery)": worker.pid})
    idle = memory.sample()
    memory.start()
    form_body = {"opt-queue": common.QUEUE, "opt-priority": "5", "opt-max_retries": "0"}
    api_headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    phases = {
        "GET /healthz (floor)": lambda: http_.request("GET", "/healthz", expect=200),
        "form submit (POST /submit/noop/)": lambda: http_.form_post(
            "/submit/noop/", form_body, cookies, expect=302
        ),
        "API submit (POST /api/runs/)": lambda: http_.request(
            "POST", "/api/runs/", json.dumps(NOOP), api_headers, expect=201
        ),
    }
    results = {name: load(call, args.clients, args.seconds) for name, call in phases.items()}
    bulk_rate = _bulk(http_, api_headers, args.bulk)
    memory.stop()
    floor = results["GET /healthz (floor)"]
    common.table(
        f"Submit latency: {args.clients} concurrent clients, {args.seconds:g} s each, gunicorn "
        f"{args.web_workers} sync workers (ms)",
        ["request", "requests/s", "p50", "p95", "errors", "p50 / floor p50"],
        [[name, r["rate"], r["p50"], r["p95"], r["errors"], r["p50"] / floor["p50"]]
         for name, r in results.items()],
    )  # fmt: skip
    single = results["API submit (POST /api/runs/)"]["rate"]
    common.table(
        f"Bulk submit: {args.bulk:,} runs in requests of 1,000 (runs/s)",
        ["path", "runs/s", "vs single API submits"],
        [["POST /api/runs/bulk/", bulk_rate, bulk_rate / single],
         [f"POST /api/runs/ ({args.clients} clients)", single, 1.0]],
    )  # fmt: skip
    peak = memory.peak
    common.table(
        "Memory (RSS, MiB; main process + children)",
        ["process", "idle", "peak under load", "processes"],
        [[name, idle[name][0], peak[name][0], idle[name][1]] for name in idle],
    )
    return {"latency": results, "bulk_rate": bulk_rate, "memory": {"idle": idle, "peak": peak}}


def _credentials():
    from django.contrib.auth.models import User

    from jobs import services

    user, _ = User.objects.get_or_create(
        username="bench", defaults={"is_superuser": True, "is_staff": True}
    )
    user.set_password("bench-pass")
    user.save()
    _, secret = services.api_token_create(user=user, name="bench.submit")
    return user, secret


def _forget_runs() -> None:
    from jobs.models import Job

    Job.objects.filter(task_name="jobs.noop").delete()


def _bulk(http_: Http, headers: dict, total: int) -> float:
    body = json.dumps({"runs": [NOOP] * 1000})
    last = json.dumps({"runs": [NOOP] * (total % 1000)})
    started = time.perf_counter()
    for _ in range(total // 1000):
        http_.request("POST", "/api/runs/bulk/", body, headers, expect=201)
    if total % 1000:
        http_.request("POST", "/api/runs/bulk/", last, headers, expect=201)
    return total / (time.perf_counter() - started)


def load(call, clients: int, seconds: float) -> dict:
    """Run ``call`` from ``clients`` threads for ``seconds``; latencies in ms."""
    samples: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                call()
            except Exception as exc:
                errors.append(str(exc)[:200])
                continue
            samples.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        print(f"  {len(errors)} errors, first: {errors[0]}", flush=True)
    return {
        "rate": len(samples) / elapsed,
        "p50": common.median(samples),
        "p95": common.percentile(samples, 0.95),
        "errors": len(errors),
    }


class Http:
    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, method, path, body=None, headers=None, *, expect: int):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            content = response.read()
        finally:
            conn.close()
        if response.status != expect:
            raise RuntimeError(f"{method} {path}: {response.status} {content[:300]!r}")
        return response, content

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.request("GET", "/healthz", expect=200)
                return
            except (OSError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def login(self, username: str, password: str) -> dict:
        response, content = self.request("GET", "/accounts/login/", expect=200)
        cookies = _cookies(response)
        token = PATTERNS["csrf"].search(content.decode()).group(1)
        form = {"username": username, "password": password, "csrfmiddlewaretoken": token}
        response, _ = self.form_post("/accounts/login/", form, cookies, expect=302, csrf=False)
        cookies.update(_cookies(response))
        return cookies

    def form_post(self, path, form, cookies, *, expect: int, csrf: bool = True):
        form = {**form, "csrfmiddlewaretoken": cookies["csrftoken"]} if csrf else form
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items()),
        }
        return self.request("POST", path, urlencode(form), headers, expect=expect)


def _cookies(response) -> dict:
    cookies = {}
    for header in response.headers.get_all("Set-Cookie") or []:
        name, _, rest = header.partition("=")
        cookies[name.strip()] = rest.split(";", 1)[0]
    return cookies


class Memory:
    """RSS of process trees, sampled every half second in a thread; MiB."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.peak = {name: (0.0, 0) for name in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> dict[str, tuple[float, int]]:
        import psutil

        figures = {}
        for name, pid in self.roots.items():
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
            rss = 0
            for process in tree:
                try:
                    rss += process.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            figures[name] = (rss / 2**20, len(tree))
        return figures

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            for name, figure in self.sample().items():
                if figure[0] > self.peak[name][0]:
                    self.peak[name] = figure

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


if __name__ == "__main__":
    main()
