#!/usr/bin/env python3
"""Jobsite's two commands, needing nothing but Python 3.11+ (standard library only).

    python3 dev.py run    # the whole system on the embedded default (SQLite + private Redis)
    python3 dev.py test   # lint, type check, checks and the whole test suite

Both create ./.venv and install the pinned requirements into it when they change.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"

PROCFILE = """\
redis: python manage.py embedded_redis
web: python manage.py runserver {address} --noreload
worker: celery -A jobsite worker --loglevel=INFO --concurrency=2 --hostname=worker@%h
beat: celery -A jobsite beat --loglevel=INFO
events: python manage.py record_events
"""

# Production-like settings for `manage.py check --deploy`.
DEPLOY_ENV = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": "deploy-check-" + "k3y" * 20,
    "DJANGO_ALLOWED_HOSTS": "jobsite.example.com",
    "DATABASE_URL": "postgres://jobsite@127.0.0.1:5432/jobsite",
    "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
    "JOBSITE_REDIS_URL": "redis://127.0.0.1:6379/1",
}


def ensure_venv(requirements: str) -> None:
    """Create .venv and (re)install requirements when their content changed."""
    if not PY.exists():
        print(f"Creating virtualenv in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    files = [ROOT / "requirements.txt", ROOT / requirements]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    stamp = VENV / f".installed-{requirements}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"Installing {requirements} into .venv ...", flush=True)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-r", str(ROOT / requirements)], check=True, cwd=ROOT)
    stamp.write_text(digest)


def run_in_venv(*args: str, env: dict | None = None, check: bool = True) -> int:
    full_env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    result = subprocess.run(list(args), cwd=ROOT, env=full_env, check=False)
    if check and result.returncode != 0:
        sys.exit(result.returncode)
    return result.returncode


def cmd_run(argv: list[str]) -> None:
    ensure_venv("requirements.txt")
    address = os.environ.get("JOBSITE_ADDRESS", "127.0.0.1:8000")
    (ROOT / "var").mkdir(exist_ok=True)
    run_in_venv(str(PY), "manage.py", "migrate", "--noinput")
    run_in_venv(str(PY), "manage.py", "ensure_superuser")
    procfile = ROOT / "var" / "Procfile"
    procfile.write_text(PROCFILE.format(address=address))
    print(f"\nJobsite: open http://{address}/  (Ctrl-C stops everything)\n", flush=True)
    env = {"PYTHONUNBUFFERED": "1"}
    # honcho stops every process on Ctrl-C; only Python's traceback is kept quiet here.
    with contextlib.suppress(KeyboardInterrupt):
        run_in_venv(
            str(BIN / "honcho"), "start", "-f", str(procfile), "-d", str(ROOT), env=env, check=False
        )


def cmd_test(argv: list[str]) -> None:
    ensure_venv("requirements-dev.txt")
    test_env = {"DJANGO_SETTINGS_MODULE": "tests.settings"}
    steps = [
        ("ruff check", [str(BIN / "ruff"), "check", "."], {}),
        ("ruff format --check", [str(BIN / "ruff"), "format", "--check", "."], {}),
        ("mypy", [str(BIN / "mypy")], {}),
        (
            "migrations are complete",
            [str(PY), "manage.py", "makemigrations", "--check", "--dry-run"],
            test_env,
        ),
        (
            "check --deploy",
            [str(PY), "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
            DEPLOY_ENV,
        ),
    ]
    if "--fast" not in argv:
        for title, args, env in steps:
            print(f"== {title}", flush=True)
            run_in_venv(*args, env=env)
    pytest_args = [a for a in argv if a != "--fast"]
    print("== pytest", flush=True)
    run_in_venv(str(PY), "-m", "pytest", *pytest_args)


def main() -> None:
    commands = {"run": cmd_run, "test": cmd_test}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__)
        sys.exit(2)
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
