"""The audit trail: every action, who did it, and how it ended."""

from __future__ import annotations

import logging

from jobs import specs
from jobs.models import (
    AuditEntry,
    AuditOutcome,
    Job,
)

logger = logging.getLogger(__name__)

# --- Audit ----------------------------------------------------------------------


def audit_record(
    *,
    actor,
    action: str,
    target_type: str,
    target_id: str,
    target_repr: str = "",
    outcome: str = AuditOutcome.OK,
    details: dict | None = None,
) -> AuditEntry:
    """Record who did what to which target and how it ended (never raises on details)."""
    return AuditEntry.objects.create(
        actor=actor if getattr(actor, "pk", None) else None,
        actor_name=getattr(actor, "username", "") or str(actor or "system"),
        action=action,
        target_type=target_type,
        target_id=str(target_id),
        target_repr=str(target_repr)[:300],
        outcome=outcome,
        details=specs.to_json(details or {}),
    )


def _audit_job(user, action: str, job: Job, outcome=AuditOutcome.OK, **details) -> None:
    audit_record(
        actor=user,
        action=action,
        target_type="run",
        target_id=job.pk,
        target_repr=str(job.job_type or job.task_name),
        outcome=outcome,
        details=details,
    )
