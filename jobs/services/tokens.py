"""API tokens: created, hashed, revoked."""

from __future__ import annotations

import hashlib
import logging

from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from jobs.models import (
    ApiToken,
    AuditAction,
)
from jobs.services.audit import audit_record
from jobs.services.errors import ActionError

logger = logging.getLogger(__name__)

# --- API tokens -------------------------------------------------------------------
# Imports are local so this block stays self-contained in a file several people edit.


def api_token_hash(secret: str) -> str:
    """The SHA-256 of a token's secret: the only form in which it is stored."""

    return hashlib.sha256(secret.encode()).hexdigest()


def api_token_create(*, user, name: str, actor=None):
    """A new token for ``user``; returns (token, secret). The secret is never stored.

    ``actor`` is who made it (a staff member in the admin); by default the user. Only
    a superuser may make one for someone else: a token acts as its owner. Raises
    PermissionDenied otherwise.
    """
    import secrets

    if actor is not None and actor.pk != user.pk and not actor.is_superuser:
        raise PermissionDenied("You may create tokens only for yourself.")

    secret = secrets.token_urlsafe(32)
    with transaction.atomic():
        token = ApiToken.objects.create(
            user=user, name=name, prefix=secret[:8], key_hash=api_token_hash(secret)
        )
        _audit_token(actor or user, AuditAction.TOKEN_CREATE, token)
    return token, secret


def api_token_revoke(*, token, user):
    """Revoke a token (its owner, or staff with ``jobs.change_apitoken``); it is kept, refused."""

    if token.user_id != user.pk and not user.has_perm("jobs.change_apitoken"):
        raise PermissionDenied("You may not revoke this token.")
    now = timezone.now()
    with transaction.atomic():
        # Conditional, so that two revokes at once record one revocation.
        active = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True)
        updated = active.update(revoked_at=now)
        if not updated:
            raise ActionError("This token is already revoked.")
        token.revoked_at = now
        _audit_token(user, AuditAction.TOKEN_REVOKE, token)
    return token


def _audit_token(actor, action: str, token) -> None:
    audit_record(
        actor=actor,
        action=action,
        target_type="api_token",
        target_id=token.pk,
        target_repr=str(token),
        details={"owner": token.user.get_username(), "prefix": token.prefix},
    )
