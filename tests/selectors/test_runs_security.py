"""History search never matches inside secret parameters (jobs/selectors/runs.py).

A viewer sees every run with its secrets masked. If search looked into the stored
parameters, the viewer could still recover a secret one character at a time:
``q="new_password": "a``, then ``"ab``, ... watching whether the run is listed.
"""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth.models import User
from django.urls import reverse

from jobs.models import Job
from jobs.roles import setup_roles

SECRET = "Tr0ub4dor-3-horse"


@pytest.fixture
def viewer(db) -> User:
    user = User.objects.create_user("viewer", password="viewer-pass")
    user.groups.add(setup_roles()["viewer"])
    return user


@pytest.fixture
def secret_run(alice, job_types) -> Job:
    job_type = job_types["rotate_credentials"]
    return Job.objects.create(
        id=str(uuid.uuid4()), job_type=job_type, task_name=job_type.task_name,
        submitted_by=alice, params={"service": "billing-db", "new_password": SECRET},
    )  # fmt: skip


@pytest.fixture
def plain_run(alice, job_types) -> Job:
    job_type = job_types["count_primes"]
    return Job.objects.create(
        id=str(uuid.uuid4()), job_type=job_type, task_name=job_type.task_name,
        submitted_by=alice, params={"limit": 424242},
    )  # fmt: skip


def found_on_page(client, **query) -> list[str]:
    response = client.get(reverse("jobs-history"), query)
    assert response.status_code == 200
    return [job.pk for job in response.context["page"].rows]


def found_by_api(client, **query) -> list[str]:
    response = client.get("/api/runs/", query)
    assert response.status_code == 200, response.content[:300]
    return [run["id"] for run in response.json()["results"]]


GUESSES = [f'"new_password": "{SECRET[:n]}' for n in range(1, len(SECRET) + 1)] + [SECRET]


@pytest.mark.parametrize("narrowed", [False, True], ids=["any-job-type", "job_type="])
@pytest.mark.parametrize("search", [found_on_page, found_by_api], ids=["page", "api"])
def test_a_viewer_cannot_recover_a_secret_one_character_at_a_time(
    client, viewer, secret_run, plain_run, search, narrowed
):
    client.force_login(viewer)
    narrow = {"job_type": "rotate_credentials"} if narrowed else {}

    hits = [guess for guess in GUESSES if secret_run.pk in search(client, q=guess, **narrow)]

    assert hits == []
    # The viewer does see the run (masked), and search still finds text in parameters.
    assert secret_run.pk in search(client, **narrow)
    assert search(client, q='"limit": 424242') == [plain_run.pk]
