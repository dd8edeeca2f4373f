"""Alert evaluation and delivery: failed runs, missed schedules, silent beat or workers.

``alerts_check`` runs every minute as the maintenance task ``jobsite.alerts_check``
(from CELERY_BEAT_SCHEDULE) and on demand as ``manage.py alerts_check``. It reads
instead of hooking the worker, so the tracking hot path is untouched:

- Failed runs: the runs that reached FAILURE since a high-water mark (finished_at, id)
  kept in Redis, read through the (state, created_at) index. FAILURE is final (a
  retried run is RETRY until its last attempt), so each run is alerted exactly once.
  Without a mark (first check, Redis emptied) it looks back FAILURE_LOOKBACK only.
- Conditions that last (a missed schedule, beat or all workers silent) alert once when
  they begin, as an "open incident" key in Redis, and again only after they clear.

Each alert is an Alert row (``alert_raise``, which folds alerts within a
rule's min_interval into the previous one), then sent by e-mail and/or a signed
webhook; the outcome is stored on the row.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from redis.exceptions import LockError

from jobs import redis
from jobs.heartbeat import beat_last_seen
from jobs.models import Alert, AlertRule, Job, JobState, WebhookRefused, webhook_target
from jobs.selectors.schedule_slots import Slot, schedule_slots
from jobs.selectors.workers import workers_online

logger = logging.getLogger(__name__)

MARK_KEY = "jobsite:alerts:failures-mark"
LOCK_KEY = "jobsite:alerts:lock"
OPEN_KEY = "jobsite:alerts:open:"
SILENT_KEY = "jobsite:alerts:silent:"
FAILURE_LOOKBACK = timedelta(hours=1)
# Bounds the scan by the indexed created_at: a run failing more than a day after its
# submission is not alerted (an index on (state, finished_at) would lift this).
FAILURE_SLACK = timedelta(days=1)
BATCH = 500
INCIDENT_TTL = 7 * 24 * 3600
SUBJECT_MAX = 300  # Alert.subject's length
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]")


@dataclass
class CheckResult:
    failures: int = 0
    raised: int = 0
    folded: int = 0
    skipped: bool = False


def alerts_check(*, now: datetime | None = None) -> CheckResult:
    """Evaluate every enabled rule once; concurrent checks are skipped (a Redis lock)."""
    lock = redis.client().lock(LOCK_KEY, timeout=600, blocking=False)
    if not lock.acquire():
        return CheckResult(skipped=True)
    try:
        now = now or timezone.now()
        rules = list(AlertRule.objects.filter(enabled=True).select_related("job_type"))
        result = CheckResult()
        _check_failures(rules, now, result)
        _check_schedules(rules, now, result)
        _check_heartbeats(rules, now, result)
        return result
    finally:
        # It may have expired during a very long check: then there is nothing to release.
        with contextlib.suppress(LockError):
            lock.release()


def _raise(rule: AlertRule, kind: str, subject: str, payload: dict, result, **kw) -> None:
    alert = alert_raise(rule=rule, kind=kind, subject=subject, payload=payload, **kw)
    if alert is None:
        result.folded += 1
        return
    result.raised += 1
    deliver(alert)


# --- Failed runs ----------------------------------------------------------------------


def _check_failures(rules: list[AlertRule], now: datetime, result: CheckResult) -> None:
    client = redis.client()
    for job in _failures_since_mark(now):
        result.failures += 1
        for rule in rules:
            if rule.on_failure and rule.job_type_id in (None, job.job_type_id):
                _raise(
                    rule,
                    "run_failed",
                    _failure_subject(job),
                    _run_payload(job),
                    result,
                    job=job,
                    now=now,
                )
        # Moved after each run: a crash part-way never alerts the earlier runs twice.
        client.set(MARK_KEY, json.dumps([_iso(job.finished_at), job.pk]))


def _failures_since_mark(now: datetime) -> list[Job]:
    failed = Job.objects.filter(
        state=JobState.FAILURE, created_at__gte=now - FAILURE_SLACK, finished_at__isnull=False
    ).select_related("job_type", "submitted_by")
    floor = now - FAILURE_LOOKBACK
    raw = redis.client().get(MARK_KEY)
    if raw:
        at, pk = json.loads(raw)
        mark = datetime.fromisoformat(at)
        if mark >= floor:
            after = Q(finished_at__gt=mark) | Q(finished_at=mark, pk__gt=pk)
            return list(failed.filter(after).order_by("finished_at", "id")[:BATCH])
    return list(failed.filter(finished_at__gte=floor).order_by("finished_at", "id")[:BATCH])


def _failure_subject(job: Job) -> str:
    name = job.job_type.title if job.job_type else job.task_name
    error = f"{job.exception_type}: {job.error_message}".strip(": ")
    return f"[Jobsite] {name} failed: {error}"


def _run_payload(job: Job) -> dict:
    return {
        "run": {
            "id": job.pk,
            "job_type": job.job_type.name if job.job_type else None,
            "task_name": job.task_name,
            "state": job.state,
            "exception_type": job.exception_type,
            "error_message": job.error_message[:2000],
            "retries": job.retries,
            "submitted_by": job.submitted_by.get_username() if job.submitted_by else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "url": settings.JOBSITE_BASE_URL + job.get_absolute_url(),
        }
    }


# --- Conditions that last: missed schedules, silent beat or workers --------------------


def _incident_begins(name: str, holding: bool) -> bool:
    """True the first time a condition holds; it may begin again only after it clears."""
    client = redis.client()
    if not holding:
        client.delete(OPEN_KEY + name)
        return False
    return bool(client.set(OPEN_KEY + name, "1", nx=True, ex=INCIDENT_TTL))


def _check_schedules(rules: list[AlertRule], now: datetime, result: CheckResult) -> None:
    watching = [rule for rule in rules if rule.on_schedule_missed]
    if not watching:
        return
    from django_celery_beat.models import PeriodicTask

    grace = timedelta(seconds=settings.JOBSITE_ALERT_SCHEDULE_GRACE)
    for task in PeriodicTask.objects.filter(enabled=True):
        late = _lateness(task, now)
        if not _incident_begins(f"schedule:{task.pk}", late is not None and late > grace):
            continue
        assert late is not None  # an incident begins only while it is late
        subject = (
            f"[Jobsite] Schedule “{task.name}” missed its run ({int(late.total_seconds())} s late)"
        )
        payload = {
            "schedule": {
                "id": task.pk,
                "name": task.name,
                "task": task.task,
                "last_run_at": _iso(task.last_run_at),
                "late_seconds": round(late.total_seconds()),
            }
        }
        for rule in watching:
            if rule.job_type is None or rule.job_type.task_name == task.task:
                _raise(rule, "schedule_missed", subject, payload, result, now=now)
    for task in PeriodicTask.objects.filter(enabled=True).exclude(crontab=None, clocked=None):
        late = _lateness(task, now)
        # While the schedule is late the alert above covers its missed slots.
        still_late = late is not None and late > grace
        for slot in _problem_slots(task, now, grace):
            if slot.status == "missed" and still_late:
                continue
            if not _incident_begins(f"slot:{task.pk}:{int(slot.at.timestamp())}", True):
                continue  # raised once per slot
            what = "missed its run" if slot.status == "missed" else "ran twice"
            subject = f"[Jobsite] Schedule “{task.name}” {what} at {slot.at:%Y-%m-%d %H:%M %Z}"
            payload = {
                "schedule": {
                    "id": task.pk,
                    "name": task.name,
                    "task": task.task,
                    "slot": slot.at.isoformat(),
                    "status": slot.status,
                    "runs": [job.pk for job in slot.runs],
                }
            }
            for rule in watching:
                if rule.job_type is None or rule.job_type.task_name == task.task:
                    _raise(rule, "schedule_missed", subject, payload, result, now=now)


SLOT_ALERT_HOURS = 2


def _problem_slots(task, now: datetime, grace: timedelta) -> list[Slot]:
    """The missed or doubled slots of the last SLOT_ALERT_HOURS, older than ``grace``."""
    slots = schedule_slots(task, hours=SLOT_ALERT_HOURS, now=now) or []
    return [s for s in slots if s.status in ("missed", "doubled") and now - s.at > grace]


def _lateness(task, now: datetime) -> timedelta | None:
    """How long ago the schedule's next run was due (None: not due yet, or not known)."""
    if task.start_time and task.start_time > now:
        return None
    last = task.last_run_at or task.date_changed
    try:
        remaining = task.schedule.remaining_estimate(last)
    except Exception:  # a schedule celery cannot evaluate is not "missed"
        logger.warning("Could not evaluate schedule %s", task.name, exc_info=True)
        return None
    return -remaining if remaining < timedelta(0) else None


def _check_heartbeats(rules: list[AlertRule], now: datetime, result: CheckResult) -> None:
    watching = [rule for rule in rules if rule.on_heartbeat_lost]
    if not watching:
        return
    grace = timedelta(seconds=settings.JOBSITE_ALERT_HEARTBEAT_GRACE)
    seen = beat_last_seen()
    if _incident_begins("beat", seen is None or now - seen > grace):
        when = f"last seen {_iso(seen)}" if seen else "never seen"
        for rule in watching:
            _raise(
                rule,
                "beat_lost",
                f"[Jobsite] Beat is silent ({when})",
                {"beat_last_seen": _iso(seen)},
                result,
                now=now,
            )
    silent_since = _silent_since("workers", not workers_online())
    if _incident_begins("workers", silent_since is not None and now - silent_since > grace):
        for rule in watching:
            _raise(
                rule,
                "workers_lost",
                "[Jobsite] No worker answers a ping",
                {"silent_since": _iso(silent_since)},
                result,
                now=now,
            )


def _silent_since(name: str, silent: bool) -> datetime | None:
    """When a silence that still lasts was first noticed (None: not silent)."""
    client = redis.client()
    if not silent:
        client.delete(SILENT_KEY + name)
        return None
    client.set(SILENT_KEY + name, f"{time.time():.3f}", nx=True, ex=INCIDENT_TTL)
    since = client.get(SILENT_KEY + name)
    assert since is not None  # set just above (or kept from the first sighting)
    return datetime.fromtimestamp(float(since), tz=UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- Delivery ---------------------------------------------------------------------------


def deliver(alert: Alert) -> None:
    """Send an alert by e-mail and/or webhook as its rule says; store how it went."""
    rule = alert.rule
    errors, email_sent, webhook_status = [], False, ""
    recipients = [a.strip() for a in rule.emails.split(",") if a.strip()]
    if recipients:
        try:
            send_mail(alert.subject, _email_body(alert), None, recipients)
            email_sent = True
        except Exception as exc:  # SMTP faults of every kind: recorded, not raised
            errors.append(f"e-mail: {exc}")
    if rule.webhook_url:
        webhook_status, error = post_webhook(
            rule.webhook_url, webhook_body(alert), rule.webhook_secret
        )
        if error:
            errors.append(f"webhook: {error}")
    alert_record_delivery(
        alert=alert, email_sent=email_sent, webhook_status=webhook_status, error="\n".join(errors)
    )


def _email_body(alert: Alert) -> str:
    details = json.dumps(alert.payload, indent=2, ensure_ascii=False, sort_keys=True)
    folded = alert.payload.get("folded_into_previous") or 0
    note = f"\n{folded} similar alert(s) were folded into the previous message.\n" if folded else ""
    if alert.payload.get("previous_undelivered"):
        note += "\nThe previous alert of this kind was not delivered (see the alerts admin).\n"
    return f"{alert.subject}\n{note}\nRule: {alert.rule.name}\n\n{details}\n"


def webhook_body(alert: Alert) -> bytes:
    body = {
        "alert": alert.pk,
        "kind": alert.kind,
        "rule": alert.rule.name,
        "subject": alert.subject,
        "created_at": alert.created_at.isoformat(),
        **alert.payload,
    }
    return json.dumps(body, sort_keys=True, ensure_ascii=False).encode()


def signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post_webhook(url: str, body: bytes, secret: str) -> tuple[str, str]:
    """POST the JSON body, retried with backoff on 5xx/429/network errors: (status, error).

    Each attempt checks the URL's addresses again (models.webhook_target) and connects to
    the one it checked; redirects are never followed. What is stored for staff to see
    says only "unreachable" for every connection fault — refused, reset, timed out — so
    that webhooks cannot be used to scan ports; the detail goes to the log.
    """
    headers = {"Content-Type": "application/json", "User-Agent": "Jobsite-Alerts/1"}
    if secret:
        headers["X-Jobsite-Signature"] = signature(body, secret)
    attempts = settings.JOBSITE_ALERT_WEBHOOK_ATTEMPTS
    status, error = "", ""
    for attempt in range(1, attempts + 1):
        status, error, retry = _post_once(url, body, headers)
        if not retry:
            return status, error
        if attempt < attempts:
            time.sleep(settings.JOBSITE_ALERT_WEBHOOK_BACKOFF * 2 ** (attempt - 1))
    return f"{status} after {attempts} attempts", error


def _post_once(url: str, body: bytes, headers: dict) -> tuple[str, str, bool]:
    """One attempt: (status, error, worth retrying)."""
    try:
        host, port, addresses = webhook_target(url)
    except WebhookRefused as exc:
        return "refused", str(exc), False
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    connection = connection_class(
        host, port, address=addresses[0], timeout=settings.JOBSITE_ALERT_WEBHOOK_TIMEOUT
    )
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        code, reason = response.status, response.reason
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, TLS, ...
        logger.warning("Webhook %s (%s) unreachable: %r", url, addresses[0], exc)
        return "unreachable", UNREACHABLE, True
    finally:
        connection.close()
    if 300 <= code < 400:
        return str(code), f"HTTP {code}: redirect refused (webhooks do not follow redirects)", False
    if code >= 400:
        return str(code), f"HTTP {code} {reason}", code >= 500 or code == 429
    return str(code), "", False


UNREACHABLE = "no answer (connection failed, closed or timed out)"


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to the address that was checked, not to a fresh DNS answer."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """The same over TLS, the certificate checked against the URL's host name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


def alert_raise(*, rule, kind: str, subject: str, payload: dict, job: Job | None = None, now=None):
    """Record an alert for a rule, or fold it into the rule's last alert of that kind.

    Within ``rule.min_interval`` seconds of the last alert of the same kind, nothing new
    is recorded (or sent): the last one's ``suppressed`` count goes up and None is
    returned — but only if that last one was delivered (no delivery error): folding into
    an alert nobody received would silence alerting. Otherwise a new Alert is stored,
    its payload saying how many were folded into the previous one and, when that one
    was not delivered, which it was. The row lock keeps two concurrent checks from both
    sending.
    """
    now = now or timezone.now()
    with transaction.atomic():
        type(rule).objects.select_for_update().filter(pk=rule.pk).first()
        last = rule.alerts.filter(kind=kind).order_by("-created_at", "-id").first()
        recent = last and last.created_at > now - timedelta(seconds=rule.min_interval)
        if recent and not last.error:
            Alert.objects.filter(pk=last.pk).update(suppressed=F("suppressed") + 1)
            return None
        payload = {**payload, "folded_into_previous": last.suppressed if last else 0}
        if recent:
            payload["previous_undelivered"] = last.pk
        subject = clean_subject(subject)
        return Alert.objects.create(
            rule=rule, kind=kind, job=job, subject=subject, payload=payload, created_at=now
        )


def clean_subject(subject: str) -> str:
    """One line (an e-mail header may hold no line break), at most SUBJECT_MAX characters."""
    line = " ".join(_CONTROL.sub(" ", subject).split())
    return line if len(line) <= SUBJECT_MAX else line[: SUBJECT_MAX - 1] + "…"


def alert_record_delivery(*, alert, email_sent: bool, webhook_status: str, error: str) -> None:
    alert.email_sent = email_sent
    alert.webhook_status = webhook_status[:100]
    alert.error = error
    alert.save(update_fields=["email_sent", "webhook_status", "error"])
