"""The API honours its own OpenAPI schema: schemathesis generates requests from it.

Every operation in /api/schema is called with generated valid and invalid input
through the real WSGI application, authenticated with a real token; no answer may be a
5xx or differ from the schema (status code, content type, body, headers).

(schemathesis's pytest fixture loader reads a private pytest attribute that pytest 9
removed, so the operations are driven with its documented Hypothesis strategies.)
"""

from __future__ import annotations

import pytest
import schemathesis
from django.contrib.auth.models import Permission
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from jobs import services
from jobs.models import Job, JobState
from jobsite.wsgi import application

# Generated calls cancel and retry runs: revoke broadcasts and publishes reach the broker.
pytestmark = pytest.mark.broker

OPERATIONS = {
    "GET /api/runs/", "POST /api/runs/", "POST /api/runs/bulk/", "GET /api/runs/{job_id}/",
    "POST /api/runs/{job_id}/cancel/", "POST /api/runs/{job_id}/retry/",
    "GET /api/job-types/", "GET /api/schedules/",
}  # fmt: skip
# A cursor, a job type name, a queue or a start time can be well-formed and still not
# exist or be in the past: the schema cannot say so, and a 400 for them is right.
EXCLUDED_CHECKS = [positive_data_acceptance]
KNOWN_RUNS = [f"run-{state.lower()}" for state in (JobState.PENDING, JobState.FAILURE)]


@pytest.fixture
def token_headers(alice, granted) -> dict:
    _, secret = services.api_token_create(user=alice, name="schemathesis")
    # Runs to show, cancel and retry, so generated calls reach past the 404s.
    for run_id in KNOWN_RUNS:
        Job.objects.create(
            id=run_id, job_type=granted["count_primes"], task_name="jobs.count_primes",
            submitted_by=alice, state=run_id.split("-")[1].upper(), params={"limit": 100},
        )  # fmt: skip
    # A schedule to list, and the permission to see it.
    alice.user_permissions.add(Permission.objects.get(codename="view_periodictask"))
    every = IntervalSchedule.objects.create(every=5, period=IntervalSchedule.MINUTES)
    PeriodicTask.objects.create(
        name="Primes", task="jobs.count_primes", interval=every, kwargs='{"limit": 10}'
    )
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def api_schema(db, token_headers):
    # As Django's test client does: the request signals must not close the test's
    # connection, which holds the test's transaction.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi("/api/schema", application, headers=token_headers)
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def cases(operation, mode: GenerationMode):
    """Generated cases, and some aimed at real runs and job types (random ones are 404s)."""
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.NEGATIVE:
        return strategy  # overriding a part could make an invalid case valid
    if "{job_id}" in operation.path:
        known = st.sampled_from(KNOWN_RUNS).flatmap(
            lambda run_id: operation.as_strategy(path_parameters={"job_id": run_id})
        )
        return st.one_of(strategy, known)
    if operation.label == "POST /api/runs/":
        # A real job type with generated parameters, or valid ones with generated options.
        return st.one_of(
            strategy,
            strategy.map(lambda case: _with_body(case, job_type="count_primes")),
            strategy.map(
                lambda case: _with_body(case, job_type="count_primes", params={"limit": 1000})
            ),
        )
    return strategy


def _with_body(case, **fields):
    if isinstance(case.body, dict):
        case.body = {**case.body, **fields}
    return case


def test_every_api_operation_honours_the_openapi_schema(api_schema, token_headers):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} == OPERATIONS

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=cases(operation, mode))
            @settings(
                max_examples=25,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            )
            def check(case):
                case.call_and_validate(headers=token_headers, excluded_checks=EXCLUDED_CHECKS)

            check()
