"""Jobsite's records: the catalogue of runnable job types, and one row per run."""

from __future__ import annotations

import ipaddress
import socket
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from jobs import specs


class JobState(models.TextChoices):
    PENDING = "PENDING", "Pending"
    RECEIVED = "RECEIVED", "Received"
    STARTED = "STARTED", "Started"
    PROGRESS = "PROGRESS", "In progress"
    RETRY = "RETRY", "Retrying"
    SUCCESS = "SUCCESS", "Succeeded"
    FAILURE = "FAILURE", "Failed"
    REVOKED = "REVOKED", "Cancelled"
    LOST = "LOST", "Lost"


FINISHED_STATES = frozenset({JobState.SUCCESS, JobState.FAILURE, JobState.REVOKED, JobState.LOST})
RETRYABLE_STATES = frozenset({JobState.FAILURE, JobState.REVOKED, JobState.LOST})
ACTIVE_STATES = frozenset({JobState.RECEIVED, JobState.STARTED, JobState.PROGRESS, JobState.RETRY})
# Not started executing: a cancel still stops these before any job code runs.
NOT_STARTED_STATES = (JobState.PENDING, JobState.RECEIVED, JobState.RETRY)


class JobSource(models.TextChoices):
    FORM = "form", "Web form"
    API = "api", "API"
    BEAT = "beat", "Schedule (beat)"
    SCHEDULE_NOW = "schedule-now", "Schedule, run now"
    RERUN = "rerun", "Rerun"
    RETRY = "retry", "Retry"
    WORKFLOW = "workflow", "Workflow step"
    EXTERNAL = "external", "Other code (.delay)"
    EVENTS = "events", "Seen through events"


class JobTypeQuerySet(models.QuerySet):
    def enabled(self) -> JobTypeQuerySet:
        return self.filter(enabled=True)

    def runnable_by(self, user) -> JobTypeQuerySet:
        """Enabled job types the user may submit: superusers all, others by group."""
        qs = self.enabled()
        if user.is_superuser:
            return qs
        return qs.filter(allowed_groups__in=user.groups.all()).distinct()


class JobType(models.Model):
    """A catalogued Celery task that people may run (declared with @catalog.job)."""

    name = models.SlugField("name", max_length=100, unique=True, editable=False)
    task_name = models.CharField(
        "Celery task",
        max_length=200,
        editable=False,
        help_text="Set by the declaration in code; never typed by a user.",
    )
    title = models.CharField("title", max_length=200)
    description = models.TextField("description", blank=True)
    enabled = models.BooleanField(
        "enabled", default=True, help_text="Disabled job types cannot be submitted."
    )
    allowed_groups = models.ManyToManyField(
        Group,
        verbose_name="groups that may run it",
        blank=True,
        related_name="runnable_job_types",
        help_text="Members of these groups may submit this job type. Superusers always may.",
    )
    queue = models.CharField("default queue", max_length=100, default="default")
    priority = models.PositiveSmallIntegerField(
        "default priority", default=5, help_text="0 (lowest) to 9 (highest)."
    )
    countdown = models.PositiveIntegerField(
        "default countdown (s)", default=0, help_text="Delay before the run may start."
    )
    expires = models.PositiveIntegerField(
        "expires after (s)",
        null=True,
        blank=True,
        help_text="A run not started this many seconds after submission is discarded.",
    )
    max_retries = models.PositiveSmallIntegerField("max retries", default=0)
    retry_backoff = models.PositiveIntegerField(
        "retry backoff (s)",
        default=2,
        help_text="First retry delay; doubled on every further retry, with jitter.",
    )
    retry_backoff_max = models.PositiveIntegerField("max retry delay (s)", default=600)
    soft_time_limit = models.PositiveIntegerField(
        "soft time limit (s)",
        null=True,
        blank=True,
        help_text="The job is told to stop (SoftTimeLimitExceeded) and may clean up.",
    )
    time_limit = models.PositiveIntegerField(
        "hard time limit (s)",
        null=True,
        blank=True,
        help_text="The worker process running the job is killed.",
    )
    retention_days = models.PositiveIntegerField(
        "keep runs for (days)",
        null=True,
        blank=True,
        help_text="Empty: the site-wide JOBSITE_RETENTION_DAYS.",
    )
    created_at = models.DateTimeField("created", auto_now_add=True)
    updated_at = models.DateTimeField("updated", auto_now=True)

    objects = JobTypeQuerySet.as_manager()

    class Meta:
        ordering = ["title"]
        verbose_name = "job type"

    def __str__(self) -> str:
        return self.title

    def get_absolute_url(self) -> str:
        return reverse("jobs-submit", args=[self.name])

    @property
    def spec(self):
        return specs.get(self.name)

    def is_runnable_by(self, user) -> bool:
        return JobType.objects.runnable_by(user).filter(pk=self.pk).exists()

    @property
    def is_internal(self) -> bool:
        return bool(self.spec and self.spec.internal)

    def submit_refusal(self, user, *, check_permission: bool = True) -> str | None:
        """Why ``user`` may not submit this job type now (None: they may)."""
        if self.is_internal:
            return f"“{self}” is internal: Jobsite runs it itself, no one submits it."
        if not self.enabled:
            return f"“{self}” is disabled."
        if check_permission and not self.is_runnable_by(user):
            return f"You may not run “{self}”."
        return None


class JobQuerySet(models.QuerySet):
    def visible_to(self, user) -> JobQuerySet:
        """Users see their own runs; `jobs.view_all_jobs` shows everyone's."""
        if user.has_perm("jobs.view_all_jobs"):
            return self
        return self.filter(submitted_by=user)

    def unfinished(self) -> JobQuerySet:
        return self.exclude(state__in=FINISHED_STATES)

    def running(self) -> JobQuerySet:
        return self.filter(state__in=ACTIVE_STATES)

    def unsent(self) -> JobQuerySet:
        return self.filter(state=JobState.PENDING, sent_at__isnull=True)


class Job(models.Model):
    """One run of a job type; its primary key is the Celery task id."""

    id = models.CharField("run id", max_length=255, primary_key=True)
    job_type = models.ForeignKey(
        JobType,
        verbose_name="job type",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="jobs",
        db_index=False,  # job_type_newest leads with it
    )
    task_name = models.CharField("Celery task", max_length=200)
    params = models.JSONField("parameters", default=dict, blank=True)
    options = models.JSONField(
        "options", default=dict, blank=True, help_text="Queue, priority, retries, time limits."
    )
    state = models.CharField(
        "state", max_length=16, choices=JobState.choices, default=JobState.PENDING
    )
    source = models.CharField(
        "source", max_length=16, choices=JobSource.choices, default=JobSource.FORM
    )
    submitted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name="submitted by",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="jobs",
        db_index=False,  # job_user_newest leads with it
    )
    schedule = models.ForeignKey(
        "django_celery_beat.PeriodicTask",
        verbose_name="schedule",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="jobs",
        db_index=False,  # job_schedule_newest leads with it
    )
    schedule_name = models.CharField("schedule name", max_length=200, blank=True)
    parent = models.ForeignKey(
        "self",
        verbose_name="rerun of",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="reruns",
        db_index=False,  # Meta.indexes: a plain index (no varchar_pattern_ops twin)
    )
    workflow_id = models.CharField("workflow (root task id)", max_length=255, blank=True)
    queue = models.CharField("queue", max_length=100, blank=True)
    priority = models.PositiveSmallIntegerField("priority", null=True, blank=True)
    idempotency_key = models.CharField("idempotency key", max_length=200, null=True, blank=True)

    created_at = models.DateTimeField("submitted", default=timezone.now)
    sent_at = models.DateTimeField(
        "sent to broker", null=True, blank=True, help_text="Empty while waiting for the broker."
    )
    eta = models.DateTimeField("not before", null=True, blank=True)
    expires_at = models.DateTimeField("expires", null=True, blank=True)
    received_at = models.DateTimeField("received", null=True, blank=True)
    started_at = models.DateTimeField("started", null=True, blank=True)
    finished_at = models.DateTimeField("finished", null=True, blank=True)
    worker = models.CharField("worker", max_length=255, blank=True)

    retries = models.PositiveSmallIntegerField("retries", default=0)
    retry_history = models.JSONField(
        "retry history", default=list, blank=True, help_text="One entry per retry."
    )
    progress_current = models.BigIntegerField("progress", null=True, blank=True)
    progress_total = models.BigIntegerField("progress total", null=True, blank=True)
    progress_message = models.CharField("progress message", max_length=500, blank=True)

    result = models.JSONField("result", null=True, blank=True)
    result_file = models.CharField(
        "result file", max_length=500, blank=True, help_text="Relative to MEDIA_ROOT."
    )
    exception_type = models.CharField("exception", max_length=255, blank=True)
    error_message = models.TextField("error", blank=True)
    traceback = models.TextField("traceback", blank=True)
    duplicates_skipped = models.PositiveIntegerField(
        "duplicate deliveries skipped",
        default=0,
        help_text="Times the same run was delivered again and not executed twice.",
    )
    event_clock = models.FloatField(
        "last event",
        null=True,
        blank=True,
        help_text="Timestamp of the last task event applied (runs seen through events): "
        "an older event arriving late never moves the run back.",
    )
    executions = models.PositiveIntegerField(
        "executions",
        default=0,
        db_default=0,  # rows written by raw SQL (bulk loads, COPY) start at 0 too
        help_text="Times the run started executing, retries included (exact for job "
        "types with the guard; for others, the starts recorded before the run ended). "
        "More than its attempts: a worker died while running it and it ran again.",
    )

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "run"
        permissions = [
            ("view_all_jobs", "Can see every user's runs"),
            ("control_jobs", "Can cancel, retry and rerun the runs they see"),
            ("manage_workers", "Can control workers and queues"),
        ]
        indexes = [
            models.Index(fields=["-created_at", "-id"], name="job_newest"),
            # Every index costs each state write (a new row version per transition):
            # plain indexes only where nothing else leads with the column.
            models.Index(fields=["parent"], name="job_parent"),
            models.Index(fields=["workflow_id"], name="job_workflow"),
            models.Index(fields=["submitted_by", "-created_at", "-id"], name="job_user_newest"),
            models.Index(fields=["state", "-created_at", "-id"], name="job_state_newest"),
            models.Index(fields=["job_type", "-created_at", "-id"], name="job_type_newest"),
            models.Index(fields=["queue", "-created_at", "-id"], name="job_queue_newest"),
            models.Index(fields=["schedule", "-created_at", "-id"], name="job_schedule_newest"),
            models.Index(
                fields=["created_at"],
                name="job_unsent",
                condition=Q(state="PENDING", sent_at__isnull=True),
            ),
            # The dashboard's series by finish time: an index-only scan of the window.
            models.Index(
                fields=["finished_at", "state"],
                name="job_finished",
                condition=Q(finished_at__isnull=False),
            ),
            # The dashboard's runtime and wait percentiles per job type over the last
            # 24 h: every column they read is in the index (an index-only scan).
            models.Index(
                fields=["created_at"],
                name="job_started_timings",
                include=["task_name", "started_at", "finished_at", "eta"],
                condition=Q(started_at__isnull=False),
            ),
            # Text search (run id prefix is the primary key's pattern index; text in
            # parameters and errors uses trigram GIN indexes made by migration 0004
            # on PostgreSQL only).
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["submitted_by", "idempotency_key"],
                name="job_idempotency_key_per_user",
                condition=Q(idempotency_key__isnull=False),
            )
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.id}]"

    def get_absolute_url(self) -> str:
        return reverse("jobs-detail", args=[self.id])

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def progress_percent(self) -> int | None:
        if not self.progress_total:
            return None
        return max(0, min(100, round(100 * (self.progress_current or 0) / self.progress_total)))

    @property
    def executions_note(self) -> str:
        """Said when the run executed more often than it was attempted ("" otherwise)."""
        if self.executions <= (self.retries or 0) + 1:
            return ""
        return (
            f"Executed {self.executions} times: a worker died while running it and it ran "
            "again (at least once after a crash; its logs say when). Check its side effect."
        )

    @property
    def result_file_name(self) -> str:
        return self.result_file.rsplit("/", 1)[-1]

    @property
    def wait_time(self) -> timedelta | None:
        if not self.started_at:
            return None
        return self.started_at - max(self.created_at, self.eta or self.created_at)

    @property
    def runtime(self) -> timedelta | None:
        if not self.started_at or not self.finished_at:
            return None
        return self.finished_at - self.started_at


class JobLog(models.Model):
    """A log line a run wrote while it ran (captured by the worker)."""

    job = models.ForeignKey(Job, verbose_name="run", on_delete=models.CASCADE, related_name="logs")
    created_at = models.DateTimeField("time")
    level = models.CharField("level", max_length=10)
    logger = models.CharField("logger", max_length=200, blank=True)
    message = models.TextField("message")

    class Meta:
        ordering = ["job", "created_at", "id"]
        verbose_name = "log line"
        indexes = [models.Index(fields=["job", "created_at", "id"], name="joblog_job_time")]

    def __str__(self) -> str:
        return f"{self.level} {self.message[:80]}"


class AuditAction(models.TextChoices):
    SUBMIT = "submit", "Submit"
    CANCEL = "cancel", "Cancel"
    TERMINATE = "terminate", "Terminate"
    RETRY = "retry", "Retry"
    RERUN = "rerun", "Rerun"
    DELETE = "delete", "Delete"
    PURGE = "purge", "Purge queue"
    PAUSE = "pause", "Pause queue"
    RESUME = "resume", "Resume queue"
    POOL_GROW = "pool_grow", "Grow pool"
    POOL_SHRINK = "pool_shrink", "Shrink pool"
    CONSUMER_ADD = "consumer_add", "Add queue consumer"
    CONSUMER_CANCEL = "consumer_cancel", "Cancel queue consumer"
    SHUTDOWN = "shutdown", "Shut down worker"
    RATE_LIMIT = "rate_limit", "Change task rate limit"
    TIME_LIMIT = "time_limit", "Change task time limits"
    AUTOSCALE = "autoscale", "Autoscale pool"
    POOL_RESTART = "pool_restart", "Restart pool"
    REVOKE_BY_NAME = "revoke_by_name", "Cancel runs by task name"
    SCHEDULE_CREATE = "schedule_create", "Create schedule"
    SCHEDULE_CHANGE = "schedule_change", "Change schedule"
    SCHEDULE_DELETE = "schedule_delete", "Delete schedule"
    SCHEDULE_ENABLE = "schedule_enable", "Enable schedule"
    SCHEDULE_DISABLE = "schedule_disable", "Disable schedule"
    SCHEDULE_RUN_NOW = "schedule_run_now", "Run schedule now"
    SCHEDULE_RESTORE = "schedule_restore", "Restore schedule version"
    TOKEN_CREATE = "token_create", "Create API token"
    TOKEN_REVOKE = "token_revoke", "Revoke API token"
    JOBTYPE_CHANGE = "jobtype_change", "Change job type"
    MESSAGE_REJECTED = "message_rejected", "Reject broker message"
    RUNS_LOST = "runs_lost", "Mark runs lost"


class AuditOutcome(models.TextChoices):
    OK = "ok", "Done"
    FAILED = "failed", "Failed"
    DENIED = "denied", "Denied"


class AuditEntry(models.Model):
    """Who did what to which target, when, and how it ended."""

    created_at = models.DateTimeField("time", default=timezone.now, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name="who",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="audit_entries",
    )
    actor_name = models.CharField(
        "who (name)", max_length=150, blank=True, help_text="Kept when the user is deleted."
    )
    action = models.CharField("action", max_length=32, choices=AuditAction.choices)
    target_type = models.CharField(
        "target type", max_length=32, help_text="run, queue, worker, schedule, ..."
    )
    target_id = models.CharField("target", max_length=255)
    target_repr = models.CharField("target (name)", max_length=300, blank=True)
    outcome = models.CharField(
        "outcome", max_length=10, choices=AuditOutcome.choices, default=AuditOutcome.OK
    )
    details = models.JSONField("details", default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "audit entry"
        verbose_name_plural = "audit entries"
        indexes = [
            models.Index(fields=["target_type", "target_id", "-created_at"], name="audit_target"),
            models.Index(fields=["actor", "-created_at"], name="audit_actor"),
        ]

    def __str__(self) -> str:
        return f"{self.actor_name} {self.action} {self.target_type}:{self.target_id}"


class ScheduleVersion(models.Model):
    """One change to a schedule: who made it, when, and its fields before and after.

    ``before`` and ``after`` are snapshots (jobs.services.schedules.schedule_snapshot):
    plain JSON, the stored parameters unmasked (as PeriodicTask.kwargs holds them; pages
    mask them). ``before`` is empty for a creation, ``after`` for a deletion. A version
    outlives its schedule (``schedule`` becomes null, ``schedule_name`` stays).
    """

    schedule = models.ForeignKey(
        "django_celery_beat.PeriodicTask",
        verbose_name="schedule",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="versions",
        db_index=False,  # schedule_version_newest leads with it
    )
    schedule_name = models.CharField("schedule name", max_length=200)
    number = models.PositiveIntegerField("version", help_text="1, 2, ... per schedule.")
    created_at = models.DateTimeField("time", default=timezone.now)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name="who",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    actor_name = models.CharField(
        "who (name)", max_length=150, blank=True, help_text="Kept when the user is deleted."
    )
    action = models.CharField("action", max_length=32, choices=AuditAction.choices)
    before = models.JSONField("before", default=dict, blank=True)
    after = models.JSONField("after", default=dict, blank=True)
    changed = models.JSONField("changed fields", default=list, blank=True)
    restored_from = models.ForeignKey(
        "self",
        verbose_name="restored from",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "schedule version"
        verbose_name_plural = "schedule versions"
        indexes = [
            models.Index(fields=["schedule", "-number"], name="schedule_version_newest"),
        ]

    def __str__(self) -> str:
        return f"{self.schedule_name} v{self.number}"


class ApiToken(models.Model):
    """A per-user API token; only a hash of the secret is stored."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name="user",
        on_delete=models.CASCADE,
        related_name="api_tokens",
    )
    name = models.CharField("name", max_length=100, help_text="What the token is for.")
    prefix = models.CharField("prefix", max_length=12, db_index=True, editable=False)
    key_hash = models.CharField("key hash (SHA-256)", max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField("created", auto_now_add=True)
    last_used_at = models.DateTimeField("last used", null=True, blank=True)
    revoked_at = models.DateTimeField("revoked", null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


# --- Webhook targets: alerts never POST into the site's own network -----------------------

# In this order: 127.0.0.1 is also "private", 169.254.169.254 too.
_REFUSED_KINDS = (
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_unspecified", "unspecified"),
    ("is_reserved", "reserved"),
    ("is_private", "private"),
)


class WebhookRefused(ValueError):
    """A webhook URL Jobsite does not send to: its scheme, or an address it resolves to."""


def webhook_target(url: str) -> tuple[str, int, list[str]]:
    """The host, port and addresses of a webhook URL that may be sent to, resolved now.

    Refuses (WebhookRefused) anything but http(s), and hosts with any address that is
    loopback, link-local, multicast, unspecified, reserved, private or otherwise not
    global, unless JOBSITE_WEBHOOK_ALLOWED_HOSTS lists the host or a network holding
    the address. Checked when a rule is saved and again before each send, which then
    connects to one of the addresses returned: a DNS answer that changes in between
    cannot point the request elsewhere.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("Only http:// and https:// webhook URLs with a host are sent to.")
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused("The webhook URL's port is not a valid number.") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise WebhookRefused(f"The webhook host {host} does not resolve.") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    allowed = [entry.lower() for entry in settings.JOBSITE_WEBHOOK_ALLOWED_HOSTS]
    if host.lower() not in allowed:
        for address in addresses:
            kind = _internal_kind(address, allowed)
            if kind:
                raise WebhookRefused(
                    f"The webhook host {host} resolves to {address}, a {kind} address. "
                    "Webhooks are not sent to loopback, private, link-local, multicast, "
                    "reserved or unspecified addresses unless JOBSITE_WEBHOOK_ALLOWED_HOSTS "
                    "lists the host."
                )
    return host, port, addresses


def _internal_kind(address: str, allowed: list[str]) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for entry in allowed:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return None
        except ValueError:  # a host name, not a network
            continue
    for attribute, kind in _REFUSED_KINDS:
        if getattr(ip, attribute):
            return kind
    return None if ip.is_global else "non-global"  # e.g. 100.64.0.0/10


class AlertRule(models.Model):
    """When to notify whom: a run failing for good, a missed schedule, a lost heartbeat."""

    name = models.CharField("name", max_length=100)
    enabled = models.BooleanField("enabled", default=True)
    job_type = models.ForeignKey(
        JobType,
        verbose_name="job type",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="alert_rules",
        help_text="Empty: every job type.",
    )
    on_failure = models.BooleanField("when a run fails permanently", default=True)
    on_schedule_missed = models.BooleanField("when a schedule misses its run", default=False)
    on_heartbeat_lost = models.BooleanField("when beat or all workers go silent", default=False)
    emails = models.TextField("e-mail to", blank=True, help_text="Comma-separated addresses.")
    webhook_url = models.URLField("webhook URL", blank=True)
    webhook_secret = models.CharField(
        "webhook secret", max_length=200, blank=True, help_text="Signs the body (HMAC-SHA256)."
    )
    min_interval = models.PositiveIntegerField(
        "at most one message per (s)",
        default=300,
        help_text="Further alerts within this time are counted into the next message.",
    )

    class Meta:
        ordering = ["name"]
        verbose_name = "alert rule"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        super().clean()
        if self.webhook_url:
            try:
                webhook_target(self.webhook_url)
            except WebhookRefused as exc:
                raise ValidationError({"webhook_url": str(exc)}) from None


class Alert(models.Model):
    """One alert raised by a rule, and how its delivery went."""

    rule = models.ForeignKey(
        AlertRule, verbose_name="rule", on_delete=models.CASCADE, related_name="alerts"
    )
    created_at = models.DateTimeField("time", default=timezone.now, db_index=True)
    kind = models.CharField("kind", max_length=32)
    job = models.ForeignKey(
        Job, verbose_name="run", null=True, blank=True, on_delete=models.SET_NULL
    )
    subject = models.CharField("subject", max_length=300)
    payload = models.JSONField("payload", default=dict, blank=True)
    suppressed = models.PositiveIntegerField(
        "similar alerts folded in",
        default=0,
        help_text="Rate-limited alerts counted into this one.",
    )
    email_sent = models.BooleanField("e-mail sent", default=False)
    webhook_status = models.CharField("webhook status", max_length=100, blank=True)
    error = models.TextField("delivery error", blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "alert"

    def __str__(self) -> str:
        return self.subject
