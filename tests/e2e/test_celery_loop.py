"""The foundation's loop: the project's Celery app, a real worker, results in the DB."""

import pytest
from django_celery_results.models import TaskResult

from jobs.tasks.demo import count_primes
from jobsite.celery import app
from tests.conftest import wait_for


@pytest.mark.broker
def test_a_demo_task_runs_on_a_real_worker_and_its_result_is_in_the_database(worker):
    result = count_primes.delay(limit=100)

    job = wait_for(result.id)

    assert job.state == "SUCCESS"
    task_result = TaskResult.objects.get(task_id=result.id)
    assert task_result.status == "SUCCESS"
    assert task_result.task_name == "jobs.count_primes"
    assert task_result.worker.startswith(f"test-{worker.broker}@")
    assert result.get(timeout=10) == {"limit": 100, "primes": 25}


@pytest.mark.broker
def test_the_worker_answers_a_remote_control_ping(worker):
    replies = app.control.ping(destination=[_hostname(worker)], timeout=3)

    assert replies and "ok" in next(iter(replies[0].values()))


def _hostname(worker) -> str:
    import socket

    return f"test-{worker.broker}@{socket.gethostname()}"


def test_only_json_is_accepted():
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"
