"""The records admin: secrets stay masked, tokens are minted only for oneself."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django_celery_results.models import TaskResult

from jobs import services
from jobs.models import ApiToken, AuditAction, AuditEntry, Job

SECRET = "Tr0ub4dor-3-horse"
ADD_TOKEN = reverse("admin:jobs_apitoken_add")


@pytest.fixture
def secret_run(admin_user, job_types) -> Job:
    # Stored as a submit stores it (published on commit, which this test never reaches).
    params = {"service": "billing-db", "new_password": SECRET}
    return services.job_submit(
        job_type=job_types["rotate_credentials"], params=params, user=admin_user
    )


@pytest.fixture
def staff_viewer(db) -> User:
    """Staff who may view every model of the admin, and change nothing."""
    user = User.objects.create_user("staff-viewer", password="x", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__startswith="view_"))
    user.user_permissions.add(Permission.objects.get(codename="view_all_jobs"))
    return user


def test_the_runs_admin_shows_secret_parameters_masked(client, staff_viewer, secret_run):
    client.force_login(staff_viewer)

    page = client.get(reverse("admin:jobs_job_change", args=[secret_run.pk]))

    assert page.status_code == 200
    assert "billing-db" in page.content.decode()
    assert SECRET not in page.content.decode()


def test_the_task_result_admin_shows_no_secret_kwargs(client, staff_viewer, secret_run):
    # As stored before beat sent a kwargsrepr: Celery's repr of the raw kwargs.
    result = TaskResult.objects.create(
        task_id=secret_run.pk, task_name=secret_run.task_name, status="SUCCESS",
        task_kwargs=json.dumps(repr(secret_run.params)), task_args="[]",
    )  # fmt: skip
    client.force_login(staff_viewer)

    page = client.get(reverse("admin:django_celery_results_taskresult_change", args=[result.pk]))

    assert page.status_code == 200
    assert "billing-db" in page.content.decode()
    assert SECRET not in page.content.decode()


@pytest.fixture
def token_staff(db) -> User:
    user = User.objects.create_user("token-staff", password="x", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["add_apitoken", "view_apitoken"])
    )
    return user


def test_staff_may_not_mint_a_token_for_someone_else(client, token_staff, admin_user):
    client.force_login(token_staff)

    response = client.post(ADD_TOKEN, {"user": admin_user.pk, "name": "mine now"}, follow=True)

    assert not ApiToken.objects.exists()
    assert not AuditEntry.objects.filter(action=AuditAction.TOKEN_CREATE).exists()
    assert "only for yourself" in response.content.decode()
    assert "The token for" not in response.content.decode()


def test_staff_mint_their_own_token_audited_as_theirs(client, token_staff):
    client.force_login(token_staff)

    client.post(ADD_TOKEN, {"user": token_staff.pk, "name": "ci"}, follow=True)

    token = ApiToken.objects.get()
    entry = AuditEntry.objects.get(action=AuditAction.TOKEN_CREATE)
    assert token.user == token_staff
    assert entry.actor == token_staff and entry.details["owner"] == "token-staff"


def test_a_superuser_mints_a_token_for_another_user_audited_as_the_superuser(
    client, admin_user, alice
):
    client.force_login(admin_user)

    client.post(ADD_TOKEN, {"user": alice.pk, "name": "ci"}, follow=True)

    token = ApiToken.objects.get()
    entry = AuditEntry.objects.get(action=AuditAction.TOKEN_CREATE)
    assert token.user == alice
    assert entry.actor == admin_user and entry.actor_name == "root"
    assert entry.details["owner"] == "alice"


@pytest.fixture
def alert_rule(db):
    from jobs.models import AlertRule

    return AlertRule.objects.create(name="ops", emails="ops@example.com", webhook_secret=SECRET)


def alert_rule_form(**fields) -> dict:
    return {
        "name": "ops", "enabled": "on", "job_type": "", "on_failure": "on",
        "emails": "ops@example.com", "webhook_url": "", "min_interval": "300", **fields,
    }  # fmt: skip


def test_the_alert_rule_admin_never_shows_the_webhook_secret(
    client, staff_viewer, admin_user, alert_rule
):
    url = reverse("admin:jobs_alertrule_change", args=[alert_rule.pk])
    client.force_login(staff_viewer)
    seen_by_viewer = client.get(url)
    client.force_login(admin_user)
    seen_by_editor = client.get(url)

    assert seen_by_viewer.status_code == seen_by_editor.status_code == 200
    assert SECRET not in seen_by_viewer.content.decode()
    assert SECRET not in seen_by_editor.content.decode()
    assert "leave blank to keep it" in seen_by_editor.content.decode()


def test_a_blank_webhook_secret_keeps_it_and_the_box_removes_it(client, admin_user, alert_rule):
    url = reverse("admin:jobs_alertrule_change", args=[alert_rule.pk])
    client.force_login(admin_user)

    kept = client.post(url, alert_rule_form(webhook_secret=""))
    alert_rule.refresh_from_db()
    secret_after_keep = alert_rule.webhook_secret
    client.post(url, alert_rule_form(webhook_secret="", clear_webhook_secret="on"))
    alert_rule.refresh_from_db()

    assert kept.status_code == 302, kept.content.decode()[:2000]
    assert secret_after_keep == SECRET
    assert alert_rule.webhook_secret == ""
