"""The user's tokens page: create (the secret shown once), revoke (jobs.web.account)."""

from __future__ import annotations

from django.urls import reverse

from jobs import services
from jobs.models import ApiToken, AuditAction, AuditEntry

TOKENS = "/account/tokens/"


def test_the_tokens_page_shows_a_new_secret_once_and_it_works(alice_client, alice, client):
    response = alice_client.post(TOKENS, {"name": "import script"})

    assert response.status_code == 200
    secret = response.context["new_secret"]
    assert secret in response.content.decode()
    assert response["Cache-Control"].startswith("max-age=0")
    token = ApiToken.objects.get(user=alice, name="import script")
    assert token.prefix == secret[:8]
    page = alice_client.get(TOKENS).content.decode()
    assert "import script" in page and token.prefix in page and secret not in page
    entry = AuditEntry.objects.get(action=AuditAction.TOKEN_CREATE)
    assert entry.actor == alice and entry.target_id == str(token.pk)


def test_a_token_name_is_required(alice_client, alice):
    response = alice_client.post(TOKENS, {"name": ""})

    assert response.status_code == 400
    assert "This field is required" in response.content.decode()
    assert not ApiToken.objects.exists()


def test_revoking_from_the_tokens_page_needs_a_post_and_the_owner(
    alice_client, alice, alice_secret, bob
):
    token = ApiToken.objects.get(user=alice)
    services.api_token_create(user=bob, name="bob's")
    bobs_token = ApiToken.objects.get(user=bob)
    url = reverse("account-token-revoke", args=[token.pk])

    assert alice_client.get(url).status_code == 405
    bobs_url = reverse("account-token-revoke", args=[bobs_token.pk])
    assert alice_client.post(bobs_url).status_code == 404
    response = alice_client.post(url)

    assert response.status_code == 302
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None
    assert ApiToken.objects.get(pk=bobs_token.pk).revoked_at is None
    assert AuditEntry.objects.filter(action=AuditAction.TOKEN_REVOKE).count() == 1
    again = alice_client.post(url, follow=True)
    assert "already revoked" in again.content.decode()


def test_the_tokens_page_needs_a_login(client, db):
    response = client.get(TOKENS)

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
