"""Helpers of the API tests: Alice's token client, a job type with a secret, runs made directly."""

from __future__ import annotations

import json
import uuid

import pytest
from django import forms
from django.test import Client

from jobs import catalog, services, specs
from jobs.models import Job, JobType

RUNS = "/api/runs/"
VALID_PRIMES = {"job_type": "count_primes", "params": {"limit": 1000}}


@pytest.fixture
def api(client, alice_secret):
    """Alice's API client: her token on every request."""
    return ApiClient(client, alice_secret)


class ApiClient:
    def __init__(self, client: Client, secret: str | None, keyword: str = "Bearer") -> None:
        self.client = client
        self.headers = {"Authorization": f"{keyword} {secret}"} if secret else {}

    def get(self, url: str, params: dict | None = None):
        return self.client.get(url, params or {}, headers=self.headers)

    def post(self, url: str, body=None):
        return self.client.post(
            url, json.dumps(body or {}), content_type="application/json", headers=self.headers
        )


class SecretParams(forms.Form):
    service = forms.CharField(max_length=50)
    api_key = forms.CharField(max_length=100)


@pytest.fixture
def secret_job_type(db, submitters):
    """A job type with a secret parameter, declared for the test only."""
    spec = catalog.JobSpec(
        name="api_test_secret",
        task_name="jobs.api_test_secret",
        form=SecretParams,
        title="Secret test",
        secret_fields=("api_key",),
    )
    catalog.register(spec)
    job_type = JobType.objects.create(name=spec.name, **spec.defaults())
    job_type.allowed_groups.add(submitters)
    yield job_type
    specs._registry.pop(spec.name, None)


def body(response) -> dict:
    assert response["Content-Type"] == "application/json", response.content[:500]
    return response.json()


def make_run(user, job_type, **fields) -> Job:
    fields.setdefault("id", str(uuid.uuid4()))
    return Job.objects.create(
        job_type=job_type, task_name=job_type.task_name, submitted_by=user, **fields
    )


def catalog_job_type(name: str) -> JobType:
    services.jobtypes_sync()
    return JobType.objects.get(name=name)
