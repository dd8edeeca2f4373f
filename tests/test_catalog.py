"""Declaring job types anywhere: the task's own name, job_type=, remote job types."""

import pytest
from django import forms
from django.core.exceptions import ImproperlyConfigured

from jobs import catalog, services, specs
from jobs.models import JobType
from jobsite.celery import app as celery_app


class _Form(forms.Form):
    index = forms.CharField(max_length=20)


@pytest.fixture
def registry_snapshot():
    saved = dict(specs._registry)
    yield
    specs._registry.clear()
    specs._registry.update(saved)


def test_a_job_type_keeps_its_tasks_own_name(registry_snapshot):
    @catalog.job(form=_Form, title="Own name")
    def own_name_probe(self, *, index: str) -> dict:
        return {}

    spec = catalog.get("own_name_probe")
    assert spec is not None and spec.task_name == f"{__name__}.own_name_probe"
    assert own_name_probe.name == spec.task_name

    @catalog.job(form=_Form, title="Renamed", name="billing.reindex", job_type="reindex_probe")
    def whatever(self, *, index: str) -> dict:
        return {}

    assert catalog.get("reindex_probe").task_name == "billing.reindex" == whatever.name


def test_two_job_types_under_one_name_are_refused(registry_snapshot):
    catalog.remote("one.tasks.sync", form=_Form, title="One", job_type="sync_probe")
    with pytest.raises(ImproperlyConfigured, match="Two job types are named 'sync_probe'"):
        catalog.remote("two.tasks.sync", form=_Form, title="Two", job_type="sync_probe")
    with pytest.raises(ImproperlyConfigured, match="declared twice"):
        catalog.remote("one.tasks.sync", form=_Form, title="Again", job_type="other_probe")
    assert catalog.get("sync_probe").task_name == "one.tasks.sync"
    assert catalog.get("other_probe") is None


@pytest.mark.broker
@pytest.mark.django_db(transaction=True)
def test_a_remote_job_type_is_sent_by_name_and_never_imported(registry_snapshot, alice, submitters):
    spec = catalog.remote(
        "elsewhere.tasks.reindex", form=_Form, title="Reindex", queue="remote_probe"
    )
    assert spec.remote and not spec.guard
    services.jobtypes_sync()
    job_type = JobType.objects.get(name="reindex")
    job_type.allowed_groups.add(submitters)
    # Celery's own connection: the broker's key layout (transport options) as Jobsite's.
    with celery_app.connection_for_write() as conn:
        queue = conn.SimpleQueue("remote_probe")
        queue.clear()
        job = services.job_submit(
            job_type=job_type,
            params={"index": "products"},
            user=alice,
            options={"queue": "remote_probe"},
        )
        message = queue.get(timeout=10)
        message.ack()
        queue.close()
    assert message.headers["task"] == "elsewhere.tasks.reindex"
    assert message.headers["id"] == job.pk
    assert message.payload[1] == {"index": "products"}  # protocol 2: (args, kwargs, embed)
    with pytest.raises(ImportError):  # nothing of the other codebase is here
        __import__("elsewhere.tasks")
