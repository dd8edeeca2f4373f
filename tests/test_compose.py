"""Checks on docker-compose.yml, made on the configuration docker-compose resolves.

No Docker engine is needed: `docker-compose config` validates the file and prints it
with variables substituted and YAML anchors expanded. Without docker-compose the tests
are skipped locally and fail in CI (CI=true), so the check cannot silently disappear.

PyYAML is not a dependency: the resolved configuration is read as JSON when the
installed docker-compose can print it (`config --format json`, Compose v2); otherwise
the YAML is read with the Python interpreter that runs docker-compose v1, which
always has PyYAML because docker-compose v1 itself needs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"

APP_SERVICES = ("web", "worker", "beat", "events")
INFRASTRUCTURE_SERVICES = ("postgres", "redis", "rabbitmq")
AMQP_URL = "amqp://guest:guest@rabbitmq:5672//"
# The file requires DJANGO_SECRET_KEY; every check but the one about it sets this.
TEST_SECRET_KEY = "compose-test-secret-key"

_YAML_TO_JSON = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"


def _docker_compose() -> str:
    executable = shutil.which("docker-compose")
    if executable is None:
        message = (
            "docker-compose is not installed, so docker-compose.yml cannot be validated "
            "(install it with: apt-get install -y docker-compose)."
        )
        if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(message)
        pytest.skip(message)
    return executable


class Compose:
    """Runs docker-compose on the project file with a controlled environment."""

    def __init__(self, executable: str, env_file: Path):
        self.executable = executable
        self.env_file = env_file
        self._resolved: dict[tuple, dict] = {}

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        # Only PATH/HOME/locale from the outside: a JOBSITE_* or DJANGO_* variable in the
        # developer's shell, or a local .env file, must not change what is checked.
        environment = {
            name: os.environ[name]
            for name in ("PATH", "HOME", "LANG", "LC_ALL")
            if name in os.environ
        }
        environment.update({"DJANGO_SECRET_KEY": TEST_SECRET_KEY, **(env or {})})
        return subprocess.run(
            [self.executable, "--env-file", str(self.env_file), "-f", str(COMPOSE_FILE), *args],
            cwd=REPO_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def config(self, **env: str) -> dict:
        key = tuple(sorted(env.items()))
        if key not in self._resolved:
            self._resolved[key] = self._load_config(env)
        return self._resolved[key]

    def _load_config(self, env: dict[str, str]) -> dict:
        # Compose v2 prints JSON; docker-compose v1 prints its help (exit status 0!)
        # for the unknown option, so the output decides, not the exit status.
        as_json = self.run("config", "--format", "json", env=env)
        if as_json.returncode == 0:
            try:
                return json.loads(as_json.stdout)
            except ValueError:
                pass
        as_yaml = self.run("config", env=env)
        assert as_yaml.returncode == 0, f"docker-compose config failed:\n{as_yaml.stderr}"
        return self._parse_yaml(as_yaml.stdout)

    def _parse_yaml(self, text: str) -> dict:
        try:
            import yaml
        except ImportError:
            pass
        else:
            return yaml.safe_load(text)
        with open(self.executable, "rb") as script:
            first_line = script.readline().decode(errors="replace").strip()
        if not (first_line.startswith("#!") and "python" in first_line):
            pytest.fail(
                "Cannot read the YAML from docker-compose config: install PyYAML "
                "or a docker-compose that supports `config --format json`."
            )
        interpreter = first_line[2:].split()
        converted = subprocess.run(
            [*interpreter, "-c", _YAML_TO_JSON],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert converted.returncode == 0, converted.stderr
        return json.loads(converted.stdout)


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> Compose:
    env_file = tmp_path_factory.mktemp("compose") / "empty.env"
    env_file.write_text("")
    return Compose(_docker_compose(), env_file)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose.config()["services"]


def _mounts(service: dict) -> dict[str, str]:
    """Mount target -> source, for the short (v1) and long (v2) volume syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source"), volume["target"]
        mounts[target] = source
    return mounts


def test_compose_file_is_valid(compose):
    result = compose.run("config", "--quiet")

    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_a_secret_key(compose):
    result = compose.run("config", "--quiet", env={"DJANGO_SECRET_KEY": ""})

    assert result.returncode != 0
    assert "set DJANGO_SECRET_KEY" in result.stderr


def test_the_secret_key_comes_from_the_environment(compose):
    for name in APP_SERVICES:
        assert compose.config()["services"][name]["environment"]["DJANGO_SECRET_KEY"] == (
            TEST_SECRET_KEY
        ), name


def test_compose_file_uses_the_compose_specification_without_a_version_key():
    top_level_keys = [
        line.split(":")[0]
        for line in COMPOSE_FILE.read_text().splitlines()
        if line and not line[0].isspace() and not line.startswith("#")
    ]

    assert "version" not in top_level_keys


def test_compose_defines_the_app_and_infrastructure_services(services):
    for name in (*APP_SERVICES, "migrate", *INFRASTRUCTURE_SERVICES):
        assert name in services, f"service {name!r} is missing"


def test_worker_has_no_container_name_or_host_ports_so_it_can_be_scaled(services):
    worker = services["worker"]

    assert "container_name" not in worker
    assert not worker.get("ports")


def test_web_publishes_port_8000(services):
    ports = services["web"].get("ports", [])
    targets = [
        str(port["target"] if isinstance(port, dict) else port).split(":")[-1] for port in ports
    ]

    assert "8000" in targets


def test_celery_broker_defaults_to_redis_when_jobsite_broker_url_is_unset(compose):
    services = compose.config()

    for name in APP_SERVICES:
        broker = services["services"][name]["environment"]["CELERY_BROKER_URL"]
        assert broker == "redis://redis:6379/0", name


def test_celery_broker_follows_jobsite_broker_url(compose):
    services = compose.config(JOBSITE_BROKER_URL=AMQP_URL)

    for name in APP_SERVICES:
        broker = services["services"][name]["environment"]["CELERY_BROKER_URL"]
        assert broker == AMQP_URL, name


def test_every_infrastructure_service_has_a_healthcheck(services):
    for name in INFRASTRUCTURE_SERVICES:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_web_and_worker_have_healthchecks(services):
    web_check = " ".join(services["web"]["healthcheck"]["test"])
    worker_check = " ".join(services["worker"]["healthcheck"]["test"])

    assert "/healthz" in web_check
    assert "inspect ping" in worker_check


def test_app_services_wait_for_migrations_and_healthy_infrastructure(services):
    for name in APP_SERVICES:
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", name
        for infrastructure in INFRASTRUCTURE_SERVICES:
            assert depends_on[infrastructure]["condition"] == "service_healthy", (
                name,
                infrastructure,
            )


def test_migrate_waits_for_a_healthy_database(services):
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_named_volumes_exist_for_database_broker_and_media(compose):
    volumes = compose.config().get("volumes") or {}

    for name in ("postgres-data", "rabbitmq-data", "media"):
        assert name in volumes, f"named volume {name!r} is missing"


def test_named_volumes_are_mounted_where_the_data_lives(services):
    assert _mounts(services["postgres"])["/var/lib/postgresql/data"] == "postgres-data"
    assert _mounts(services["rabbitmq"])["/var/lib/rabbitmq"] == "rabbitmq-data"
    for name in ("web", "worker"):
        media_root = services[name]["environment"]["JOBSITE_MEDIA_ROOT"]
        assert _mounts(services[name])[media_root] == "media", name
