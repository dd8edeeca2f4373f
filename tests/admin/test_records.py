"""The admin of records: API tokens created and revoked by staff (jobs.admin.records)."""

from __future__ import annotations

import hashlib

from django.contrib.auth.models import Permission, User
from django.urls import reverse

from jobs.models import ApiToken, AuditAction, AuditEntry


def test_staff_create_a_token_in_the_admin_and_see_its_secret_once(client, admin_user, alice):
    client.force_login(admin_user)

    response = client.post(
        reverse("admin:jobs_apitoken_add"), {"user": alice.pk, "name": "ci"}, follow=True
    )

    token = ApiToken.objects.get(user=alice, name="ci")
    [message] = [str(m) for m in response.context["messages"] if "The token for" in str(m)]
    secret = message.split("The token for alice is ")[1].split(" ")[0]
    assert token.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    entry = AuditEntry.objects.get(action=AuditAction.TOKEN_CREATE)
    assert entry.actor == admin_user and entry.details["owner"] == "alice"
    change_page = client.get(reverse("admin:jobs_apitoken_change", args=[token.pk]))
    assert secret not in change_page.content.decode()


def test_the_admin_revoke_action_needs_the_change_permission(client, alice, alice_secret):
    token = ApiToken.objects.get(user=alice)
    viewer = User.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_apitoken"))
    changelist = reverse("admin:jobs_apitoken_changelist")
    action = {"action": "revoke", "_selected_action": [token.pk]}

    client.force_login(viewer)
    client.post(changelist, action)
    assert ApiToken.objects.get(pk=token.pk).revoked_at is None

    viewer.user_permissions.add(Permission.objects.get(codename="change_apitoken"))
    client.post(changelist, action)
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None
