"""Settings come from the environment; a bad value names the variable."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_settings(env: dict) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "jobsite.settings"}
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


PRODUCTION = {
    "DATABASE_URL": "postgres://u@127.0.0.1:5432/x",
    "DJANGO_SECRET_KEY": "x" * 60,
}


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({**PRODUCTION, "DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG"),
        ({**PRODUCTION, "DATABASE_URL": "oracle-ish://nope"}, "DATABASE_URL"),
        ({**PRODUCTION, "CELERY_BROKER_URL": "http://broker"}, "CELERY_BROKER_URL"),
        ({**PRODUCTION, "JOBSITE_REDIS_URL": "memcached://x"}, "JOBSITE_REDIS_URL"),
        ({**PRODUCTION, "DJANGO_TIME_ZONE": "Mars/Olympus"}, "DJANGO_TIME_ZONE"),
        ({**PRODUCTION, "JOBSITE_MAX_PARAMS_BYTES": "lots"}, "JOBSITE_MAX_PARAMS_BYTES"),
        ({"DATABASE_URL": "postgres://u@127.0.0.1:5432/x"}, "DJANGO_SECRET_KEY"),
        ({**PRODUCTION, "DJANGO_SECRET_KEY": "short"}, "DJANGO_SECRET_KEY"),
        ({**PRODUCTION, "JOBSITE_QUEUE_TYPE": "stream"}, "JOBSITE_QUEUE_TYPE"),
        # Quorum queues are RabbitMQ's: not on the (default, Redis) broker.
        ({**PRODUCTION, "JOBSITE_QUEUE_TYPE": "quorum"}, "JOBSITE_QUEUE_TYPE"),
    ],
)
def test_a_bad_value_stops_start_up_with_a_message_naming_the_variable(env, variable, tmp_path):
    result = _load_settings({**env, "JOBSITE_VAR_DIR": str(tmp_path)})

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert variable in result.stderr


def test_production_settings_load(tmp_path):
    env = {
        **PRODUCTION,
        "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
        "JOBSITE_VAR_DIR": str(tmp_path),
    }
    result = _load_settings(env)

    assert result.returncode == 0, result.stderr


def test_quorum_queues_turn_on_confirms_native_delays_and_per_consumer_qos(tmp_path):
    env = {
        **PRODUCTION,
        "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
        "JOBSITE_QUEUE_TYPE": "quorum",
        "JOBSITE_VAR_DIR": str(tmp_path),
    }
    show = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.CELERY_BROKER_TRANSPORT_OPTIONS['confirm_publish'], "
        "s.CELERY_BROKER_NATIVE_DELAYED_DELIVERY_QUEUE_TYPE, s.CELERY_WORKER_DETECT_QUORUM_QUEUES, "
        "s.CELERY_TASK_QUEUE_MAX_PRIORITY, s.CELERY_TASK_QUEUES[0].queue_arguments['x-queue-type'])"
    )
    base = {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "jobsite.settings"}
    result = subprocess.run(
        [sys.executable, "-c", show], cwd=ROOT, env={**base, **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "quorum", "True", "None", "quorum"]


def test_the_embedded_default_needs_no_environment(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); from django.conf import settings as s; "
            "print(s.DEBUG, s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL)",
        ],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "DJANGO_SETTINGS_MODULE": "jobsite.settings",
            "JOBSITE_VAR_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    debug, engine, broker = result.stdout.split()
    assert debug == "True"
    assert engine == "django.db.backends.sqlite3"
    assert broker == f"redis+socket://{tmp_path}/redis.sock"


def test_collectstatic_works_with_production_storage(tmp_path):
    # The Docker image runs this at build time; whitenoise's manifest storage fails on
    # any file a CSS/JS asset references but that is missing (e.g. a source map).
    env = {**PRODUCTION, "JOBSITE_VAR_DIR": str(tmp_path), "DJANGO_DEBUG": "false",
           "JOBSITE_STATIC_ROOT": str(tmp_path / "static")}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "jobsite.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "static" / "staticfiles.json").exists()


def test_the_soft_shutdown_timeout_reaches_celery_as_worker_soft_shutdown_timeout(tmp_path):
    env = {**PRODUCTION, "JOBSITE_SOFT_SHUTDOWN_TIMEOUT": "25", "JOBSITE_VAR_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c",
         "import django; django.setup(); from jobsite.celery import app; "
         "print(app.conf.worker_soft_shutdown_timeout)"],
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "jobsite.settings",
                       **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "25.0"


def test_every_setting_the_app_reads_has_a_default():
    """A host project sets only what it changes (jobs/conf.py), so each
    ``settings.JOBSITE_<NAME>`` read under jobs/ needs a default there."""
    import re

    from jobs.conf import JobsiteConf

    read = {
        name
        for path in (ROOT / "jobs").rglob("*.py")
        for name in re.findall(r"settings\.JOBSITE_([A-Z0-9_]+)", path.read_text())
    }
    defaults = {name for name in vars(JobsiteConf) if name.isupper()}
    assert read, "the scan found no setting: the pattern is wrong"
    assert read - defaults == set()
