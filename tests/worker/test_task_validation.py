"""The worker checks a catalogued job's parameters with its form, whoever sent the message.

Messages here are made by a plain Celery app that knows nothing of Jobsite (as any other
producer on the broker would make them): they carry no Jobsite headers and have no Job
row, so only the worker's own check stands between them and the job.
"""

from __future__ import annotations

import uuid

import pytest
from celery import Celery
from django.urls import reverse
from django_celery_results.models import TaskResult
from kombu import Producer

from jobs import specs
from jobs.models import JobLog
from jobs.worker.task import REFUSED
from jobsite.celery import app as celery_app
from tests.conftest import wait_for

pytestmark = pytest.mark.broker


def send_plain(task: str, kwargs: dict, args: tuple = ()) -> str:
    """Publish the protocol-2 task message a plain Celery app (kombu's defaults) makes."""
    plain = Celery("foreign", set_as_current=False)
    task_id = str(uuid.uuid4())
    message = plain.amqp.as_task_v2(task_id, task, args=args, kwargs=kwargs)
    # Through Jobsite's connection (its broker settings) to its exchange: what is checked
    # here is what the message carries, not how a producer names Redis's keys.
    with celery_app.connection_for_write() as conn:
        Producer(conn).publish(
            message.body, exchange="default", routing_key="default", serializer="json",
            headers=message.headers, **message.properties,
        )  # fmt: skip
    return task_id


def assert_refused_before_the_job_ran(task_id: str, message: str):
    job = wait_for(task_id)
    assert job.state == "FAILURE"
    assert job.exception_type == "ParametersRefused"
    assert job.error_message == f"{REFUSED}: {message}"
    # count_primes reports progress after its first segment and returns a result.
    assert job.progress_total is None and job.result is None
    assert not JobLog.objects.filter(job_id=task_id).exists()
    assert TaskResult.objects.get(task_id=task_id).status == "FAILURE"
    return job


def test_a_limit_above_the_forms_maximum_is_refused(worker, job_types):
    task_id = send_plain("jobs.count_primes", {"limit": 250_000_000})

    job = assert_refused_before_the_job_ran(
        task_id, "limit: Ensure this value is less than or equal to 200000000."
    )
    assert job.params == {"limit": 250_000_000}  # what was sent, as history shows it
    assert job.job_type == job_types["count_primes"]


def test_a_limit_that_is_no_number_is_refused(worker, job_types):
    task_id = send_plain("jobs.count_primes", {"limit": "abc"})

    assert_refused_before_the_job_ran(task_id, "limit: Enter a whole number.")


def test_parameters_the_form_does_not_know_are_refused(worker, job_types):
    task_id = send_plain("jobs.count_primes", {"limit": 5000, "extra": 1})

    assert_refused_before_the_job_ran(task_id, "extra: Unknown parameter.")


def test_a_valid_message_runs_with_the_forms_cleaned_values(worker, job_types):
    # Text, as a form posts it: the job receives the form's integer.
    task_id = send_plain("jobs.count_primes", {"limit": "5000"})

    job = wait_for(task_id)

    assert job.state == "SUCCESS", job.error_message
    assert job.result == {"limit": 5000, "primes": 669}


def test_the_run_page_says_the_worker_refused_the_parameters(worker, job_types, admin_client):
    task_id = send_plain("jobs.count_primes", {"limit": "abc"})
    wait_for(task_id)

    page = admin_client.get(reverse("jobs-detail", args=[task_id])).content.decode()

    assert "Parameters refused by the worker" in page
    assert "limit: Enter a whole number." in page
    assert 'id="run-traceback"' not in page


def test_cleaning_what_a_form_cleaned_gives_the_same_parameters():
    """Jobsite's own messages carry cleaned parameters: the worker's check keeps them."""
    given = {
        "count_primes": {"limit": "5000"},
        "flaky": {"mode": "until", "failures": "1", "message": "x",
                  "fail_until": "2030-01-02T03:04:05.678901+02:00"},
        "capability_job": {"gpu": "false", "region": "apac", "lane": "express"},
        "send_mail": {"to": "a@example.com", "subject": " Hi ", "body": "Body"},
    }  # fmt: skip
    for name, raw in given.items():
        cleaned, errors = specs.get(name).clean_params(raw)
        assert errors == {}, (name, errors)

        again, errors = specs.get(name).clean_params(cleaned)

        assert (again, errors) == (cleaned, {}), name
