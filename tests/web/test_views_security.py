"""Pages: what a request may reflect, run ids from the broker, internal job types."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from jobs.models import Job

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture
def operator(db) -> User:
    user = User.objects.create_user("operator", password="operator-pass")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["manage_workers", "view_all_jobs"])
    )
    return user


def test_a_400_page_does_not_reflect_a_choice_as_html(client, operator):
    client.force_login(operator)

    response = client.post(reverse("jobs-worker-action"), {"action": SCRIPT, "worker": "w"})

    # Plain text, never sniffed as HTML: the message holds the value as given, whatever
    # the form renderer does (Django's escapes it today, by accident of its template).
    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/plain")
    assert response["X-Content-Type-Options"] == "nosniff"
    assert f"action: Select a valid choice. {SCRIPT} is not one" in response.content.decode()


def test_a_run_id_with_a_slash_does_not_break_the_history(admin_client, job_types):
    job_type = job_types["count_primes"]
    run = Job.objects.create(
        id="from/the/broker", job_type=job_type, task_name=job_type.task_name, params={}
    )

    history = admin_client.get(reverse("jobs-history"))
    detail = admin_client.get(run.get_absolute_url())
    rerun = admin_client.get(reverse("jobs-rerun", args=[run.pk]))

    assert history.status_code == 200
    assert run.get_absolute_url() in history.content.decode()
    assert detail.status_code == 200 and detail.context["job"] == run
    assert rerun.status_code == 200 and rerun.context["rerun_of"] == run


def test_an_internal_job_type_is_neither_listed_nor_submittable(admin_client, alice, job_types):
    # Someone else's workflow, and a superuser: refused for what it is, not for who asks.
    root = Job.objects.create(
        id=str(uuid.uuid4()), task_name="jobs.count_primes", submitted_by=alice, params={}
    )
    url = reverse("jobs-submit", args=["workflow_failed"])

    listing = admin_client.get(reverse("jobs-submit-list"))
    page = admin_client.get(url)
    posted = admin_client.post(url, {"workflow_id": root.pk})

    assert url not in listing.content.decode()
    assert page.status_code == posted.status_code == 403
    assert "internal" in posted.content.decode()
    assert not Job.objects.filter(task_name="jobs.workflow_failed").exists()


def test_a_run_of_an_internal_job_type_cannot_be_retried(admin_client, job_types):
    job_type = job_types["workflow_failed"]
    failed = Job.objects.create(
        id=str(uuid.uuid4()), job_type=job_type, task_name=job_type.task_name,
        params={"workflow_id": "someone-elses"}, state="FAILURE",
    )  # fmt: skip

    response = admin_client.post(reverse("jobs-action", args=[failed.pk, "retry"]))

    assert response.status_code == 403 and "internal" in response.content.decode()
    assert Job.objects.count() == 1
