"""History, search and dashboard at scale, against django-celery-results' admin.

    .venv/bin/python -m bench.history --runs 1000000 --results 1000000

Fills the benchmark database (bench.history_data) up to the given numbers of runs and
TaskResult rows (once: later runs reuse them; --regenerate starts afresh), then times
each page in-process with Django's test Client (the server's time: URL routing,
middleware, queries, template), after a warm-up, as median and p95 of --requests
requests. The dashboard's 5-second cache is cleared before every request, so its
figures are the uncached cost.

Baselines, in the same run: django-celery-results' stock TaskResult changelist
(mounted by bench.stock_admin), and Jobsite's tuned one (jobs/admin.py).
"""

from __future__ import annotations

import argparse
import time

from bench import common

HISTORY_GOAL, SEARCH_GOAL, DASHBOARD_GOAL = 50, 300, 100  # p95, ms


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--results", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument(
        "--stock-requests", type=int, default=10, help="per stock changelist page (slow ones)"
    )
    parser.add_argument("--follow", type=int, default=200, help="history pages to follow")
    parser.add_argument("--regenerate", action="store_true")
    args = parser.parse_args(argv)
    common.django_setup()
    from django.conf import settings

    from bench import history_data

    settings.ROOT_URLCONF = "bench.stock_admin"
    print(common.machine(), flush=True)
    started = time.perf_counter()
    timings = history_data.generate(
        runs=args.runs, results=args.results, regenerate=args.regenerate
    )
    print(f"data ready in {time.perf_counter() - started:.1f} s: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()), flush=True)  # fmt: skip
    return measure(args)


class Timer:
    def __init__(self, requests: int, warmup: int = 3) -> None:
        from django.test import Client

        self.requests, self.warmup = requests, warmup
        self.clients: dict = {}
        self.Client = Client

    def client(self, user):
        if user.pk not in self.clients:
            self.clients[user.pk] = self.Client()
            self.clients[user.pk].force_login(user)
        return self.clients[user.pk]

    def time(self, user, url: str, *, uncached: bool = False, requests: int | None = None):
        """Median and p95 in milliseconds."""
        from django.core.cache import cache

        client = self.client(user)
        samples = []
        for i in range(self.warmup + (requests or self.requests)):
            if uncached:
                cache.clear()
            started = time.perf_counter()
            response = client.get(url)
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {response.content[:500]!r}")
            if i >= self.warmup:
                samples.append(elapsed)
        return common.median(samples), common.percentile(samples, 0.95)


def measure(args) -> dict:
    from bench import history_data

    admin, own, _ = history_data.users()
    timer = Timer(args.requests)
    urls = _urls(own)
    stock = _changelists(timer, admin, "/stock-admin/", args.stock_requests, urls)
    tuned = _changelists(timer, admin, "/admin/", args.requests, urls)
    rows, figures = [], {}
    for label, user, url, goal, baseline, uncached in _cases(admin, own, urls):
        p50, p95 = timer.time(user, url, uncached=uncached)
        figures[label] = (p50, p95)
        base = stock.get(baseline, (float("nan"),) * 2)[1]
        rows.append([label, p50, p95, goal, "yes" if p95 <= goal else "NO",
                     base, base / p95 if baseline else float("nan")])  # fmt: skip
    p50, p95 = _follow(timer, admin, args.follow)
    rows.append([f"history, pages 1-{args.follow} followed", p50, p95, HISTORY_GOAL,
                 "yes" if p95 <= HISTORY_GOAL else "NO", stock["deep"][1],
                 stock["deep"][1] / p95])  # fmt: skip
    common.table(
        "History, search and dashboard (ms, server time; stock = django-celery-results' "
        "TaskResult changelist, p95)",
        ["page", "p50", "p95", "goal p95", "met", "stock p95", "x faster"],
        rows,
    )
    common.table(
        "TaskResult admin changelist (ms): stock django-celery-results vs Jobsite's tuned",
        ["page", "stock p50", "stock p95", "tuned p50", "tuned p95", "x faster (p95)"],
        [[k, *stock[k], *tuned[k], stock[k][1] / tuned[k][1]] for k in stock],
    )
    return {"pages": figures, "stock": stock, "tuned": tuned}


def _urls(own) -> dict[str, str]:
    """Cursors in the middle of the range, a failed run, id prefixes: found once."""
    from django_celery_results.models import TaskResult

    from jobs.models import Job
    from jobs.selectors import encode_cursor

    def middle_cursor(queryset) -> str:
        ordered = queryset.order_by("-created_at", "-id").values_list("created_at", "pk")
        total = queryset.count()
        created, pk = ordered[total // 2]
        return encode_cursor(Job(pk=pk, created_at=created))

    failed = Job.objects.filter(state="FAILURE").order_by("-created_at").first()
    task = TaskResult.objects.order_by("-date_done").first()
    return {
        "mid": middle_cursor(Job.objects.all()),
        "mid_failed": middle_cursor(Job.objects.filter(state="FAILURE")),
        "mid_own": middle_cursor(Job.objects.filter(submitted_by=own)),
        "failed_id": failed.pk,
        "prefix": failed.pk[:8],
        "task_id": task.task_id,
        # Page 5,000 of 10,000 at a million rows (100 per page); the middle when fewer.
        "deep_page": max(1, min(5000, TaskResult.objects.count() // 200)),
    }


def _cases(admin, own, urls: dict):
    h, s, d = HISTORY_GOAL, SEARCH_GOAL, DASHBOARD_GOAL
    return [
        ("history, first page", admin, "/runs/", h, "first", False),
        ("history, first page (own runs only)", own, "/runs/", h, "first", False),
        ("history, state=FAILURE", admin, "/runs/?state=FAILURE", h, "status", False),
        ("history, job type", admin, "/runs/?job_type=count_primes", h, "status", False),
        ("history, middle cursor", admin, f"/runs/?cursor={urls['mid']}", h, "deep", False),
        ("history, middle cursor, state=FAILURE", admin,
         f"/runs/?state=FAILURE&cursor={urls['mid_failed']}", h, "deep", False),
        ("history, middle cursor (own runs)", own, f"/runs/?cursor={urls['mid_own']}", h,
         "deep", False),
        ("run page", admin, f"/runs/{urls['failed_id']}/", h, None, False),
        ("dashboard (uncached)", admin, "/", d, None, True),
        ("dashboard data.json (uncached)", admin, "/dashboard/data.json", d, None, True),
        ("dashboard, own runs (uncached)", own, "/", d, None, True),
        ("search: run id prefix", admin, f"/runs/?q={urls['prefix']}", s, "search", False),
        ("search: text in params", admin, "/runs/?q=cust-4242", s, "search", False),
        ("search: text in errors", admin, "/runs/?q=db-17.internal", s, "search", False),
        ("search: text, state=FAILURE", admin, "/runs/?state=FAILURE&q=api.example", s,
         "search", False),
        ("search: own runs, text", own, "/runs/?q=cust-4242", s, "search", False),
    ]  # fmt: skip


def _changelists(timer: Timer, admin, prefix: str, requests: int, urls: dict) -> dict:
    base = f"{prefix}django_celery_results/taskresult/"
    deep_page = urls["deep_page"]
    # The tuned admin searches exact task ids only; the stock one searches text.
    search = urls["task_id"] if prefix == "/admin/" else "cust-4242"
    pages = {
        "first": base,
        "status": f"{base}?status__exact=FAILURE",
        "search": f"{base}?q={search}",
        "deep": f"{base}?p={deep_page}",
    }
    return {k: timer.time(admin, url, requests=requests) for k, url in pages.items()}


def _follow(timer: Timer, user, pages: int) -> tuple[float, float]:
    """Follow the history's "Older" cursor from the first page, timing every page."""
    import re

    client = timer.client(user)
    url, samples = "/runs/", []
    for _ in range(pages):
        started = time.perf_counter()
        response = client.get(url)
        samples.append((time.perf_counter() - started) * 1000)
        found = re.search(rb'href="\?(?:[^"]*&amp;)?cursor=([\w-]+)"', response.content)
        if not found:
            break
        url = f"/runs/?cursor={found.group(1).decode()}"
    return common.median(samples), common.percentile(samples, 0.95)


if __name__ == "__main__":
    main()
