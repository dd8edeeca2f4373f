"""ensure_superuser shows a password only when it made one up."""

import io

from django.contrib.auth import authenticate
from django.core.management import call_command


def _run(monkeypatch, **env) -> str:
    for name in ("DJANGO_SUPERUSER_USERNAME", "DJANGO_SUPERUSER_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    call_command("ensure_superuser", stdout=out)
    return out.getvalue()


def test_it_never_prints_a_password_given_by_the_environment(db, monkeypatch):
    output = _run(monkeypatch, DJANGO_SUPERUSER_PASSWORD="chosen-by-the-operator-42")

    assert "chosen-by-the-operator-42" not in output
    assert "admin" in output
    assert authenticate(username="admin", password="chosen-by-the-operator-42") is not None


def test_it_shows_a_generated_password_once(db, monkeypatch):
    output = _run(monkeypatch)

    password = output.split("with password ")[1].split("'")[1]
    assert authenticate(username="admin", password=password) is not None
