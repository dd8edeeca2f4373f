"""The fleet test's hands inside the fleet: run on a host with ``ip netns exec``.

    python -m tests.fleet.drive setup            -> a session key of a superuser
    python -m tests.fleet.drive submit N TOKEN   -> N guarded mail runs on queue fleetq
    python -m tests.fleet.drive status TOKEN     -> JSON: states, unfinished rows
    python -m tests.fleet.drive reconcile        -> jobs_mark_lost + jobs_relay, as beat
Settings come from the environment (DATABASE_URL, CELERY_BROKER_URL, ...).
"""

from __future__ import annotations

import collections
import json
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

from django.contrib.auth.models import Group, User  # noqa: E402
from django.contrib.sessions.backends.db import SessionStore  # noqa: E402
from django.core.management import call_command  # noqa: E402

from jobs import services  # noqa: E402
from jobs.models import FINISHED_STATES, Job, JobLog, JobType  # noqa: E402

QUEUE = "fleetq"


def setup() -> None:
    call_command("migrate", verbosity=0)
    services.jobtypes_sync()
    group, _ = Group.objects.get_or_create(name="submitters")
    for job_type in JobType.objects.all():
        job_type.allowed_groups.add(group)
    user = User.objects.filter(username="fleet").first() or User.objects.create_superuser(
        "fleet", "fleet@example.com", "fleet-pass"
    )
    user.groups.add(group)
    session = SessionStore()
    session["_auth_user_id"] = str(user.pk)
    session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
    session["_auth_user_hash"] = user.get_session_auth_hash()
    session.create()
    print(session.session_key)


def submit(count: int, token: str) -> None:
    user = User.objects.get(username="fleet")
    mail = JobType.objects.get(name="send_mail")
    items = [
        (mail, {"to": "ops@example.com", "subject": f"fleet-{token}-{n}", "body": "x"},
         {"queue": QUEUE})
        for n in range(count)
    ]  # fmt: skip
    print(len(services.job_submit_many(items=items, user=user)))


def status(token: str) -> None:
    rows = Job.objects.filter(params__subject__startswith=f"fleet-{token}-")
    states = collections.Counter(rows.values_list("state", flat=True))
    stuck = list(
        rows.exclude(state__in=FINISHED_STATES).values_list("params__subject", "state")[:50]
    )
    executions = sum(1 for e in rows.values_list("executions", flat=True) if e > 1)
    resent = JobLog.objects.filter(job__in=rows, logger="jobsite.relay").count()
    failed = [
        (subject, kind, message[:300], worker)
        for subject, kind, message, worker in rows.filter(state="FAILURE").values_list(
            "params__subject", "exception_type", "error_message", "worker"
        )[:10]
    ]
    print(json.dumps({"states": states, "stuck": stuck, "executed_again": executions,
                      "resent": resent, "failed": failed}))  # fmt: skip


def reconcile() -> None:
    services.jobs_mark_lost()
    services.jobs_relay(min_age=0)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "setup":
        setup()
    elif command == "submit":
        submit(int(args[0]), args[1])
    elif command == "status":
        status(args[0])
    elif command == "reconcile":
        reconcile()
    else:
        raise SystemExit(f"unknown command {command}")
