"""A secret parameter never reaches the worker's own log, whichever handler writes it."""

from __future__ import annotations

import logging
import secrets
import time

import pytest

from jobs import services
from jobs.specs import MASK
from jobs.worker import logs
from tests.conftest import wait_for

pytestmark = pytest.mark.broker


def _log_line(worker, needle: str, timeout: float = 20) -> str:
    """The worker log's line containing ``needle``, once the worker has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in worker.log.read_text(errors="replace").splitlines():
            if needle in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} never reached the worker log:\n{worker.output()}")


def test_a_secret_a_job_logs_is_masked_in_the_worker_console_log(worker, alice, granted):
    password = "pw-" + secrets.token_hex(12)
    service = "svc-" + secrets.token_hex(4)
    job_type = granted["rotate_credentials"]
    params, errors = job_type.spec.clean_params({"service": service, "new_password": password})
    assert not errors

    job = services.job_submit(job_type=job_type, params=params, user=alice)

    assert wait_for(job.id).state == "SUCCESS"
    line = _log_line(worker, f"Rotating {service} to")
    assert line.endswith(f"Rotating {service} to {MASK}")
    assert password not in worker.log.read_text(errors="replace")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_handlers_added_later_and_on_any_logger_see_masked_records():
    logs.install_secret_mask()
    late = _Collect()
    own = logging.getLogger("tests.own-handler")
    own.propagate = False
    own.addHandler(late)
    logs.log_capture.start("run-1", ["hunter2-secret"])
    try:
        own.warning("password is %s", "hunter2-secret")
        try:
            raise ValueError("bad hunter2-secret")
        except ValueError:
            own.exception("failed")
    finally:
        logs.log_capture.stop("run-1")
    own.warning("after the run: %s", "hunter2-secret")
    own.removeHandler(late)

    assert late.lines[0] == f"password is {MASK}"
    assert "hunter2-secret" not in late.lines[1] and f"ValueError: bad {MASK}" in late.lines[1]
    assert late.lines[2] == "after the run: hunter2-secret"  # no run, nothing to mask
