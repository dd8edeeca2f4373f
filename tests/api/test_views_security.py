"""The API: internal job types, run ids from the broker, who sees which schedules."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import User
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from jobs.models import Job


@pytest.fixture
def api(client, admin_user):
    client.force_login(admin_user)
    return client


def post(client, url: str, data: dict):
    return client.post(url, json.dumps(data), content_type="application/json")


def test_an_internal_job_type_is_refused_and_not_listed(api, job_types):
    one = post(api, "/api/runs/", {"job_type": "workflow_failed", "params": {"workflow_id": "x"}})
    many = post(
        api, "/api/runs/bulk/",
        {"runs": [{"job_type": "count_primes", "params": {"limit": 10}},
                  {"job_type": "workflow_failed", "params": {"workflow_id": "x"}}]},
    )  # fmt: skip
    listing = api.get("/api/job-types/").json()

    assert one.status_code == 403 and "internal" in one.json()["detail"]
    assert many.status_code == 400
    assert "internal" in str(many.json()["runs"]["1"]["job_type"])
    assert "0" not in many.json()["runs"]
    assert not Job.objects.exists()
    assert "workflow_failed" not in {jt["name"] for jt in listing}
    assert "count_primes" in {jt["name"] for jt in listing}


def test_a_run_id_with_a_slash_is_listed_and_served(api, job_types):
    job_type = job_types["count_primes"]
    Job.objects.create(id="a/b", job_type=job_type, task_name=job_type.task_name, params={})

    listing = api.get("/api/runs/")
    [run] = listing.json()["results"]
    detail = api.get(run["url"])

    assert listing.status_code == 200
    assert detail.status_code == 200 and detail.json()["id"] == "a/b"


def schedule(name: str, task: str, kwargs: dict) -> PeriodicTask:
    interval, _ = IntervalSchedule.objects.get_or_create(every=1, period="hours")
    return PeriodicTask.objects.create(
        name=name, task=task, kwargs=json.dumps(kwargs), interval=interval
    )


def test_staff_see_only_the_schedules_of_job_types_they_may_run(
    client, admin_user, submitters, job_types
):
    job_types["count_primes"].allowed_groups.add(submitters)
    schedule("primes", "jobs.count_primes", {"limit": 10})
    schedule("rotate", "jobs.rotate_credentials", {"service": "db", "new_password": "x" * 12})
    staff = User.objects.create_user("staff", password="staff-pass", is_staff=True)
    staff.groups.add(submitters)

    client.force_login(staff)
    seen_by_staff = {s["name"] for s in client.get("/api/schedules/").json()}
    client.force_login(admin_user)
    seen_by_superuser = {s["name"] for s in client.get("/api/schedules/").json()}

    assert seen_by_staff == {"primes"}
    assert seen_by_superuser >= {"primes", "rotate"}
