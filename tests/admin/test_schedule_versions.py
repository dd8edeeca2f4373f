"""The schedule page's history: a diff per version, "Restore this version" (admin paths)."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django_celery_beat.models import PeriodicTask

from jobs import specs
from jobs.models import AuditAction, AuditEntry, AuditOutcome, ScheduleVersion
from tests.admin.test_schedules import CHANGELIST, change_url, form_data, make_schedule

SECRET = "Tr0ub4dor-3-horse"


def restore_url(task: PeriodicTask, version) -> str:
    pk = version if isinstance(version, (int, str)) else version.pk
    return reverse("admin:django_celery_beat_periodictask_restore", args=[task.pk, pk])


def versions(task) -> list[ScheduleVersion]:
    return list(ScheduleVersion.objects.filter(schedule=task).order_by("number"))


@pytest.fixture
def edited(admin_client, job_types) -> PeriodicTask:
    """Created and changed once through the admin form: versions 1 and 2."""
    job_type = job_types["count_primes"]
    created = admin_client.post(
        reverse("admin:django_celery_beat_periodictask_add"), form_data(job_type)
    )
    assert created.status_code == 302, created.content.decode()[:2000]
    task = PeriodicTask.objects.get(name="primes every 10 minutes")
    changed = admin_client.post(
        change_url(task), form_data(job_type, **{"params-limit": "50", "priority": "8"})
    )
    assert changed.status_code == 302, changed.content.decode()[:2000]
    return task


def test_admin_saves_store_versions_with_the_changed_fields(edited, admin_user):
    v1, v2 = versions(edited)

    assert (v1.action, v1.actor, v1.before) == (AuditAction.SCHEDULE_CREATE, admin_user, {})
    assert v2.action == AuditAction.SCHEDULE_CHANGE
    assert v2.changed == ["kwargs", "priority"]
    assert (v2.before["kwargs"], v2.after["kwargs"]) == ({"limit": 1000}, {"limit": 50})


def test_the_change_page_shows_each_version_with_its_diff(admin_client, edited):
    page = admin_client.get(change_url(edited)).content.decode()

    assert 'id="versions"' in page and "History (versions)" in page
    assert 'id="version-2"' in page and 'id="version-1"' in page
    assert "parameter limit" in page and "<del>1000</del>" in page and "<ins>50</ins>" in page
    assert "<del>6</del>" in page and "<ins>8</ins>" in page
    assert "every 10 minutes" in page  # the interval in words, not its id
    # v2 is the current state: only v1 can be restored, by a form outside the change form.
    assert page.count("Restore this version") == 1
    assert f'id="restore-{versions(edited)[0].pk}"' in page


def test_restore_from_the_page_puts_the_version_back_and_is_a_new_version(admin_client, edited):
    v1 = versions(edited)[0]

    response = admin_client.post(restore_url(edited, v1), follow=True)

    assert response.redirect_chain[-1][0].endswith(change_url(edited) + "#versions")
    assert "as a new version" in response.content.decode()
    stored = PeriodicTask.objects.get(pk=edited.pk)
    assert json.loads(stored.kwargs) == {"limit": 1000} and stored.priority == 6
    v3 = versions(edited)[-1]
    assert (v3.number, v3.action, v3.restored_from) == (3, AuditAction.SCHEDULE_RESTORE, v1)
    assert AuditEntry.objects.get(action=AuditAction.SCHEDULE_RESTORE).outcome == AuditOutcome.OK


def test_restore_is_post_only(admin_client, edited):
    assert admin_client.get(restore_url(edited, versions(edited)[0])).status_code == 405
    assert len(versions(edited)) == 2


def test_restoring_another_schedules_version_by_url_changes_nothing(admin_client, edited):
    other = make_schedule("other")
    other_version = ScheduleVersion.objects.create(
        schedule=other, schedule_name="other", number=1, action=AuditAction.SCHEDULE_CREATE,
        after={**versions(edited)[0].after, "name": "other"},
    )  # fmt: skip

    response = admin_client.post(restore_url(edited, other_version), follow=True)

    assert "no such version" in response.content.decode()
    assert json.loads(PeriodicTask.objects.get(pk=edited.pk).kwargs) == {"limit": 50}
    assert len(versions(edited)) == 2


@pytest.mark.parametrize("version_id", ["999999", "abc"])
def test_restoring_a_missing_version_changes_nothing(admin_client, edited, version_id):
    response = admin_client.post(restore_url(edited, version_id), follow=True)

    assert response.status_code == 200 and "no such version" in response.content.decode()
    assert len(versions(edited)) == 2


def test_restoring_on_a_missing_schedule_is_404(admin_client, edited):
    url = reverse("admin:django_celery_beat_periodictask_restore", args=[999999, 1])

    assert admin_client.post(url).status_code == 404


def test_a_viewer_sees_the_history_but_may_not_restore(client, admin_client, edited, job_types):
    viewer = User.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_periodictask"))
    client.force_login(viewer)

    page = client.get(change_url(edited)).content.decode()
    response = client.post(restore_url(edited, versions(edited)[0]), follow=True)

    assert "History (versions)" in page and "Restore this version" not in page
    assert "You may not change this schedule" in response.content.decode()
    assert json.loads(PeriodicTask.objects.get(pk=edited.pk).kwargs) == {"limit": 50}
    entry = AuditEntry.objects.get(action=AuditAction.SCHEDULE_RESTORE)
    assert (entry.outcome, entry.actor) == (AuditOutcome.DENIED, viewer)


def test_staff_without_any_schedule_permission_get_403(client, edited):
    nobody = User.objects.create_user("nobody", is_staff=True)
    client.force_login(nobody)

    assert client.post(restore_url(edited, versions(edited)[0])).status_code == 403
    assert len(versions(edited)) == 2


def test_anonymous_restore_goes_to_the_login_page(client, edited):
    response = client.post(restore_url(edited, versions(edited)[0]))

    assert response.status_code == 302 and "login" in response["Location"]
    assert len(versions(edited)) == 2


def test_the_bulk_actions_store_versions(admin_client, edited):
    for action in ("disable_schedules", "enable_schedules"):
        admin_client.post(CHANGELIST, {"action": action, "_selected_action": [edited.pk]})

    disabled, enabled = versions(edited)[2:]
    assert (disabled.action, disabled.after["enabled"]) == (AuditAction.SCHEDULE_DISABLE, False)
    assert (enabled.action, enabled.after["enabled"]) == (AuditAction.SCHEDULE_ENABLE, True)


def test_a_secret_parameter_is_masked_in_the_diff(admin_client, job_types):
    job_type = job_types["rotate_credentials"]
    post = {
        "name": "rotate", "job_type": str(job_type.pk), "enabled": "on",
        "interval": form_data(job_type)["interval"], "queue": "default", "priority": "5",
        "params-service": "billing-db", "params-new_password": SECRET, "_save": "Save",
    }  # fmt: skip
    assert (
        admin_client.post(reverse("admin:django_celery_beat_periodictask_add"), post).status_code
        == 302
    )
    task = PeriodicTask.objects.get(name="rotate")
    admin_client.post(change_url(task), {**post, "params-new_password": "another-secret-2"})

    page = admin_client.get(change_url(task)).content.decode()

    assert len(versions(task)) == 2 and versions(task)[1].changed == ["kwargs"]
    assert "parameter new_password" in page and specs.MASK in page
    assert SECRET not in page and "another-secret-2" not in page
