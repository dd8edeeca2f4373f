"""The latest a run may be put off: JOBSITE_MAX_ETA_DAYS, and on Redis the visibility timeout."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import forms
from jobs.forms import SubmitOptionsForm
from tests.conftest import BROKERS, use_broker


@pytest.fixture
def on_rabbitmq():
    use_broker(BROKERS["rabbitmq"])
    yield
    use_broker(BROKERS["redis"])


def options(job_type, **given) -> SubmitOptionsForm:
    data = {"queue": job_type.queue, "priority": "5", "max_retries": "0", **given}
    return SubmitOptionsForm(data=data, job_type=job_type, prefix=None)


def test_on_redis_the_maximum_is_the_visibility_timeout(job_types, settings):
    settings.JOBSITE_MAX_ETA_DAYS = 30
    ahead = timezone.now() + timedelta(hours=2)

    form = options(job_types["count_primes"], run_at=ahead.isoformat())

    assert forms.max_eta() == timedelta(seconds=3600)
    assert not form.is_valid()
    assert "visibility timeout" in form.errors["run_at"][0]
    assert options(job_types["count_primes"], countdown="3500").is_valid()
    assert not options(job_types["count_primes"], countdown="3700").is_valid()


def test_on_rabbitmq_the_maximum_is_jobsite_max_eta_days(job_types, settings, on_rabbitmq):
    settings.JOBSITE_MAX_ETA_DAYS = 30
    in_29_days = (timezone.now() + timedelta(days=29)).isoformat()
    in_31_days = (timezone.now() + timedelta(days=31)).isoformat()

    assert forms.max_eta() == timedelta(days=30)
    assert options(job_types["count_primes"], run_at=in_29_days).is_valid()
    assert (
        "at most 30 days ahead"
        in options(job_types["count_primes"], run_at=in_31_days).errors["run_at"][0]
    )
