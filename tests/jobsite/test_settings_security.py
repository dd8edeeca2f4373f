"""Security settings: X-Forwarded-Proto is trusted only when a proxy is said to set it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
PRODUCTION = {"DATABASE_URL": "postgres://u@127.0.0.1:5432/x", "DJANGO_SECRET_KEY": "x" * 60}
PRINT_HEADER = (
    "import json, django; django.setup(); from django.conf import settings; "
    "print(json.dumps(settings.SECURE_PROXY_SSL_HEADER))"
)


def _load(env: dict, tmp_path) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "jobsite.settings"}
    return subprocess.run(
        [sys.executable, "-c", PRINT_HEADER],
        cwd=ROOT,
        env={**base, "JOBSITE_VAR_DIR": str(tmp_path), **PRODUCTION, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _header(env: dict, tmp_path):
    result = _load(env, tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_x_forwarded_proto_is_not_trusted_by_default(tmp_path):
    assert _header({}, tmp_path) is None


def test_x_forwarded_proto_is_trusted_when_the_setting_says_a_proxy_sets_it(tmp_path):
    env = {"JOBSITE_TRUST_X_FORWARDED_PROTO": "true"}

    assert _header(env, tmp_path) == ["HTTP_X_FORWARDED_PROTO", "https"]


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_a_bad_trust_value_stops_start_up(value, tmp_path):
    result = _load({"JOBSITE_TRUST_X_FORWARDED_PROTO": value}, tmp_path)

    assert result.returncode != 0
    assert "JOBSITE_TRUST_X_FORWARDED_PROTO" in result.stderr
