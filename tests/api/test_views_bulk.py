"""POST /api/runs/bulk/: many submits in one request, all or nothing, errors per item."""

from __future__ import annotations

import json

import pytest

from jobs import services
from jobs.models import AuditAction, AuditEntry, Job, JobState
from tests.conftest import wait_for

BULK = "/api/runs/bulk/"


def primes(limit: int = 1000, **options) -> dict:
    return {"job_type": "count_primes", "params": {"limit": limit}, "options": options}


@pytest.fixture
def post(client, alice):
    _, secret = services.api_token_create(user=alice, name="bulk tests")

    def post(body, token: str | None = secret):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return client.post(BULK, json.dumps(body), content_type="application/json", headers=headers)

    return post


@pytest.mark.broker
def test_it_stores_publishes_and_runs_every_item_in_order(worker, granted, alice, post):
    response = post({"runs": [primes(1000), primes(2000, priority=7), primes(3000)]})

    assert response.status_code == 201, response.content
    runs = response.json()["runs"]
    assert [run["sent"] for run in runs] == [True, True, True]
    assert runs[0]["url"].endswith(f"/api/runs/{runs[0]['id']}/")
    finished = [wait_for(run["id"]) for run in runs]
    assert [job.state for job in finished] == [JobState.SUCCESS] * 3
    assert [job.result["limit"] for job in finished] == [1000, 2000, 3000]
    assert [job.priority for job in finished] == [5, 7, 5]
    assert {job.submitted_by for job in finished} == {alice}
    audited = AuditEntry.objects.filter(
        action=AuditAction.SUBMIT, target_id__in=[r["id"] for r in runs]
    )
    assert audited.count() == 3


def test_it_reports_each_refused_item_by_index_and_stores_nothing(granted, post):
    body = {
        "runs": [
            primes(1000),
            primes(1),  # below the form's minimum
            {"job_type": "no_such_job", "params": {}},
            {"job_type": "count_primes", "params": {"limit": 10, "colour": "red"}},
            primes(1000, queue="reports"),  # not one of count_primes' queues
        ]
    }

    response = post(body)

    assert response.status_code == 400
    errors = response.json()["runs"]
    assert sorted(errors) == ["1", "2", "3", "4"]
    assert "limit" in errors["1"]["params"]
    assert "no_such_job" in errors["2"]["job_type"][0]
    assert errors["3"]["params"]["colour"] == ["Unknown field."]
    assert "queue" in errors["4"]["options"]
    assert Job.objects.count() == 0
    assert AuditEntry.objects.filter(action=AuditAction.SUBMIT).count() == 0


def test_it_refuses_job_types_the_user_may_not_run_or_that_are_disabled(job_types, alice, post):
    job_types["send_mail"].allowed_groups.add(*alice.groups.all())
    job_types["send_mail"].enabled = False
    job_types["send_mail"].save()
    mail = {"job_type": "send_mail", "params": {"to": "a@example.com", "subject": "s", "body": "b"}}

    response = post({"runs": [primes(1000), mail]})

    assert response.status_code == 400
    errors = response.json()["runs"]
    assert "may not run" in errors["0"]["job_type"][0]
    assert "disabled" in errors["1"]["job_type"][0]
    assert Job.objects.count() == 0


def test_it_refuses_an_empty_list_and_more_than_a_thousand_items(granted, post):
    too_many = post({"runs": [primes(1000)] * (services.BULK_SUBMIT_MAX + 1)})
    empty = post({"runs": []})

    assert too_many.status_code == 400
    assert "1000" in too_many.json()["runs"][0]
    assert empty.status_code == 400
    assert Job.objects.count() == 0


def test_it_refuses_idempotency_keys_and_oversized_parameters_per_item(granted, post, settings):
    body = {"runs": [primes(1000, idempotency_key="k1"), primes(1000), primes(10**8)]}
    settings.JOBSITE_MAX_PARAMS_BYTES = len(json.dumps({"limit": 1000}))

    response = post(body)

    assert response.status_code == 400
    errors = response.json()["runs"]
    assert errors["0"]["options"] == {"idempotency_key": ["Not accepted in a bulk submit."]}
    assert "1" not in errors
    assert "limit is" in errors["2"]["params"][0]
    assert Job.objects.count() == 0


def test_it_needs_credentials(granted, post):
    response = post({"runs": [primes(1000)]}, token=None)

    assert response.status_code == 401
    assert Job.objects.count() == 0
