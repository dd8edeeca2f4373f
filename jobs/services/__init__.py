"""Every write Jobsite makes. Views, the API, the admin and tasks call these.

One module per concern; the public names are re-exported here, so callers say
``services.job_submit(...)`` without knowing which module holds it.
"""

from __future__ import annotations

from jobs.services.alerts import (
    alert_raise,
    alert_record_delivery,
    alerts_check,
)
from jobs.services.audit import (
    audit_record,
)
from jobs.services.catalog import (
    jobtypes_sync,
)
from jobs.services.control import (
    BULK_ACTIONS,
    NOT_STARTED,
    job_bulk,
    job_cancel,
    job_delete,
    job_rerun,
    job_retry,
    job_terminate,
    workflow_cancel,
)
from jobs.services.errors import (
    BROKER_ERRORS,
    ActionError,
)
from jobs.services.fleet import (
    PAUSED_QUEUES_KEY,
    WORKER_ACTIONS,
    queue_purge,
    queue_set_paused,
    queues_paused,
    worker_control,
)
from jobs.services.maintenance import (
    jobs_cleanup,
    jobs_expire,
    jobs_mark_lost,
    jobs_relay,
    jobs_resend_vanished,
)
from jobs.services.messages import (
    broker_breaker,
    message_kwargs,
    message_options,
)
from jobs.services.redis_queues import (
    RedisQueueMigration,
    redis_queues_migrate,
)
from jobs.services.runs import (
    BULK_SUBMIT_MAX,
    BulkSubmitError,
    job_publish,
    job_submit,
    job_submit_many,
    job_type_masked,
    jobs_publish_many,
)
from jobs.services.schedules import (
    schedule_delete,
    schedule_restore,
    schedule_run_now,
    schedule_save,
    schedule_set_enabled,
)
from jobs.services.tokens import (
    api_token_create,
    api_token_hash,
    api_token_revoke,
)
from jobs.services.workflows import (
    broadcast_record,
    workflow_publish,
    workflow_record_failure,
    workflow_submit,
)

__all__ = [
    "BROKER_ERRORS",
    "BULK_ACTIONS",
    "BULK_SUBMIT_MAX",
    "NOT_STARTED",
    "PAUSED_QUEUES_KEY",
    "WORKER_ACTIONS",
    "ActionError",
    "BulkSubmitError",
    "RedisQueueMigration",
    "alert_raise",
    "alert_record_delivery",
    "alerts_check",
    "api_token_create",
    "api_token_hash",
    "api_token_revoke",
    "audit_record",
    "broadcast_record",
    "broker_breaker",
    "job_bulk",
    "job_cancel",
    "job_delete",
    "job_publish",
    "job_rerun",
    "job_retry",
    "job_submit",
    "job_submit_many",
    "job_terminate",
    "job_type_masked",
    "jobs_cleanup",
    "jobs_expire",
    "jobs_mark_lost",
    "jobs_publish_many",
    "jobs_relay",
    "jobs_resend_vanished",
    "jobtypes_sync",
    "message_kwargs",
    "message_options",
    "queue_purge",
    "queue_set_paused",
    "queues_paused",
    "redis_queues_migrate",
    "schedule_delete",
    "schedule_restore",
    "schedule_run_now",
    "schedule_save",
    "schedule_set_enabled",
    "worker_control",
    "workflow_cancel",
    "workflow_publish",
    "workflow_record_failure",
    "workflow_submit",
]
