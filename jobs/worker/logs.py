"""Log capture: the log lines a run writes, buffered and stored as JobLog rows, masked.

The same secret values are masked in every other log record the worker makes
(``install_secret_mask``), so the console log and any handler added later never show
them either.
"""

from __future__ import annotations

import logging
from datetime import datetime

from celery import current_task
from django.db import IntegrityError
from django.utils import timezone

from jobs import specs
from jobs.models import JobLog
from jobs.specs import MASK
from jobs.worker.tracking import MAX_LOG_LINES, MAX_LOG_MESSAGE

logger = logging.getLogger(__name__)

_IGNORED_LOGGERS = ("celery", "kombu", "amqp", "django.db", "urllib3")
# Jobsite's own worker machinery speaks for itself in the worker's log, not the run's.
_OWN_LOGGERS = (__name__, "jobs.worker.task", "jobs.worker.tracking")


class JobLogCapture(logging.Handler):
    """Buffers the log records a run writes, and stores them as JobLog rows."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.buffers: dict[str, list] = {}
        self.counts: dict[str, int] = {}
        self.secrets: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_IGNORED_LOGGERS) or record.name in _OWN_LOGGERS:
            return
        task = current_task
        task_id = task.request.id if task is not None else None
        if not task_id or task_id not in self.buffers:
            return
        if self.counts[task_id] >= MAX_LOG_LINES:
            return
        self.counts[task_id] += 1
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break the job
            message = str(record.msg)
        for secret in self.secrets.get(task_id, ()):
            message = message.replace(secret, MASK)
        self.buffers[task_id].append(
            (
                datetime.fromtimestamp(record.created, tz=timezone.get_current_timezone()),
                record.levelname,
                record.name,
                message[:MAX_LOG_MESSAGE],
            )
        )

    def start(self, task_id: str, secrets: list[str] | None = None) -> None:
        self.buffers[task_id] = []
        self.counts[task_id] = 0
        # Longest first, so a secret containing another is masked whole.
        self.secrets[task_id] = sorted((s for s in secrets or () if s), key=len, reverse=True)

    def flush(self, task_id: str | None = None) -> None:
        if task_id is None or not self.buffers.get(task_id):
            return

        lines, self.buffers[task_id] = self.buffers[task_id], []
        rows = [
            JobLog(job_id=task_id, created_at=at, level=level, logger=name, message=message)
            for at, level, name, message in lines
        ]
        try:
            JobLog.objects.bulk_create(rows)
        except IntegrityError:
            logger.warning("Could not store %d log lines of run %s", len(rows), task_id)

    def stop(self, task_id: str) -> None:
        self.flush(task_id)
        self.buffers.pop(task_id, None)
        self.counts.pop(task_id, None)
        self.secrets.pop(task_id, None)


log_capture = JobLogCapture()


class SecretMask(logging.Filter):
    """Masks the secret parameters of the runs in progress in this process, in place.

    The values come from the log capture (set at task_prerun, dropped at postrun): every
    run in the process counts, so a thread logging for another run is masked too. A
    record that holds no secret is left as it is (its msg and args untouched).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        running = [s for values in log_capture.secrets.values() for s in values]
        if not running:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        masked = _mask(message, running)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            text = _formatter.formatException(record.exc_info)
            if _mask(text, running) != text:  # else the handler's own formatter formats it
                record.exc_text = _mask(text, running)
        if record.stack_info:
            record.stack_info = _mask(record.stack_info, running)
        return True


def _mask(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


_formatter = logging.Formatter()
secret_mask = SecretMask()


def install_secret_mask() -> None:
    """Mask secrets in every record this process makes, for every handler.

    A filter on the root's handlers would miss records of loggers that do not
    propagate (Celery's ``celery.task`` logger has its own handler) and handlers added
    after it was installed, so the filter runs where each record is made instead.
    """
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "masks_secrets", False):
        return

    def masked_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        secret_mask.filter(record)
        return record

    masked_record.masks_secrets = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(masked_record)


def install_log_capture() -> None:
    install_secret_mask()
    root = logging.getLogger()
    if log_capture not in root.handlers:
        root.addHandler(log_capture)


def secret_values(task_name: str, kwargs: dict | None) -> list[str]:
    spec = specs.by_task_name(task_name)
    if spec is None or not spec.secret_fields or not kwargs:
        return []
    return [str(kwargs[name]) for name in spec.secret_fields if kwargs.get(name)]
