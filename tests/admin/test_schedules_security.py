"""The schedule admin: stored secrets stay out of the HTML; editors stay within their grants."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from jobs.models import Job, JobType

SECRET = "Tr0ub4dor-3-horse"
ADD = reverse("admin:django_celery_beat_periodictask_add")


def change_url(task: PeriodicTask) -> str:
    return reverse("admin:django_celery_beat_periodictask_change", args=[task.pk])


def run_now_url(task: PeriodicTask) -> str:
    return reverse("admin:django_celery_beat_periodictask_run_now", args=[task.pk])


def interval() -> IntervalSchedule:
    return IntervalSchedule.objects.get_or_create(every=1, period="hours")[0]


def make_schedule(name: str, task: str, kwargs: dict, **fields) -> PeriodicTask:
    return PeriodicTask.objects.create(
        name=name, task=task, kwargs=json.dumps(kwargs), interval=interval(), **fields
    )


def rotate_form(job_type: JobType, **params) -> dict:
    """What the change form posts for a rotate-credentials schedule."""
    return {
        "name": "rotate", "job_type": str(job_type.pk), "enabled": "on",
        "interval": str(interval().pk), "queue": "default", "priority": "5",
        "params-service": "billing-db", **{f"params-{k}": v for k, v in params.items()},
        "_save": "Save",
    }  # fmt: skip


@pytest.fixture
def rotate(job_types) -> PeriodicTask:
    return make_schedule(
        "rotate", "jobs.rotate_credentials", {"service": "billing-db", "new_password": SECRET}
    )


def test_the_change_form_never_renders_a_stored_secret(admin_client, rotate, job_types):
    page = admin_client.get(change_url(rotate)).content.decode()
    invalid = admin_client.post(
        change_url(rotate), {**rotate_form(job_types["rotate_credentials"]), "priority": "99"}
    )

    assert 'name="params-new_password"' in page
    assert "Leave blank to keep the stored value" in page
    assert SECRET not in page
    assert invalid.status_code == 400 and SECRET not in invalid.content.decode()


def test_a_blank_secret_keeps_the_stored_value_and_a_new_one_replaces_it(
    admin_client, rotate, job_types
):
    job_type = job_types["rotate_credentials"]

    kept = admin_client.post(change_url(rotate), rotate_form(job_type, new_password=""))
    stored_after_keep = json.loads(PeriodicTask.objects.get(pk=rotate.pk).kwargs)
    admin_client.post(change_url(rotate), rotate_form(job_type, new_password="another-secret-1"))
    stored_after_change = json.loads(PeriodicTask.objects.get(pk=rotate.pk).kwargs)

    assert kept.status_code == 302, kept.content.decode()[:2000]
    assert stored_after_keep == {"service": "billing-db", "new_password": SECRET}
    assert stored_after_change["new_password"] == "another-secret-1"


@pytest.fixture
def editor(client, submitters, job_types) -> User:
    """Staff who may edit schedules and run count_primes only."""
    job_types["count_primes"].allowed_groups.add(submitters)
    user = User.objects.create_user("editor", password="x", is_staff=True)
    user.groups.add(submitters)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="django_celery_beat")
    )
    client.force_login(user)
    return user


def test_an_editor_cannot_create_a_schedule_of_a_job_type_they_may_not_run(
    client, editor, job_types
):
    page = client.get(ADD).content.decode()
    posted = client.post(ADD, rotate_form(job_types["rotate_credentials"], new_password=SECRET))

    assert "Count primes" in page and "Rotate credentials" not in page
    assert posted.status_code == 400
    assert not PeriodicTask.objects.filter(name="rotate").exists()


def test_an_editor_cannot_run_now_a_schedule_of_a_job_type_they_may_not_run(client, editor, rotate):
    response = client.post(run_now_url(rotate), follow=True)

    assert not Job.objects.exists()
    assert "You may not run" in response.content.decode()


def test_run_now_refuses_reserved_headers_stored_outside_the_admin_form(admin_client, job_types):
    typed_in = make_schedule(
        "typed in", "jobs.count_primes", {"limit": 10}, headers=json.dumps({"kwargsrepr": "{}"})
    )

    response = admin_client.post(run_now_url(typed_in), follow=True)

    assert not Job.objects.exists()
    assert "kwargsrepr" in response.content.decode()


def test_internal_job_types_are_not_offered_nor_run_now(admin_client, alice, job_types):
    errback = make_schedule("errback", "jobs.workflow_failed", {"workflow_id": "someone-elses"})

    page = admin_client.get(ADD).content.decode()
    response = admin_client.post(run_now_url(errback), follow=True)

    assert "Workflow failed" not in page
    assert not Job.objects.exists()
    assert "internal" in response.content.decode()
