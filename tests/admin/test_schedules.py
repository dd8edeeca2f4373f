"""The schedule admin: job types and their forms, run now, permissions (jobs.admin.schedules)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    PeriodicTasks,
    SolarSchedule,
)
from kombu import Exchange, Queue

from jobs import catalog, heartbeat, redis, routing, specs
from jobs.models import AuditAction, AuditEntry, Job, JobSource, JobType
from jobs.selectors import schedules
from jobs.tasks.demo import PrimesParams
from jobsite.celery import app as celery_app
from tests.conftest import wait_for

CHANGELIST = reverse("admin:django_celery_beat_periodictask_changelist")
ADD = reverse("admin:django_celery_beat_periodictask_add")


def change_url(task: PeriodicTask) -> str:
    return reverse("admin:django_celery_beat_periodictask_change", args=[task.pk])


def run_now_url(task: PeriodicTask) -> str:
    return reverse("admin:django_celery_beat_periodictask_run_now", args=[task.pk])


def form_data(job_type: JobType, **overrides) -> dict:
    """What the admin's add/change form posts for a count-primes schedule."""
    interval, _ = IntervalSchedule.objects.get_or_create(every=10, period="minutes")
    data = {
        "name": "primes every 10 minutes",
        "job_type": str(job_type.pk),
        "enabled": "on",
        "description": "",
        "interval": str(interval.pk),
        "crontab": "",
        "solar": "",
        "clocked": "",
        "start_time_0": "",
        "start_time_1": "",
        "expires_0": "",
        "expires_1": "",
        "expire_seconds": "",
        "queue": "cpu",
        "priority": "6",
        "exchange": "",
        "routing_key": "",
        "headers": "",
        "params-limit": "1000",
        "_save": "Save",
    }
    data.update(overrides)
    return data


def make_schedule(name="primes", *, kwargs=None, **fields) -> PeriodicTask:
    if not any(k in fields for k in ("interval", "crontab", "solar", "clocked")):
        fields["interval"], _ = IntervalSchedule.objects.get_or_create(every=1, period="hours")
    return PeriodicTask.objects.create(
        name=name,
        task="jobs.count_primes",
        kwargs=json.dumps(kwargs if kwargs is not None else {"limit": 1000}),
        **fields,
    )


@pytest.fixture
def admin_client(client, admin_user, job_types):
    client.force_login(admin_user)
    return client


@pytest.fixture
def viewer_client(client, db, job_types):
    """A staff user who may only view schedules (and runs)."""
    user = User.objects.create_user("viewer", password="viewer-pass", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_periodictask", "view_job", "view_all_jobs"])
    )
    client.force_login(user)
    return client


# --- Creating and editing -------------------------------------------------------------


def test_the_add_form_offers_job_types_and_no_task_name_field(admin_client):
    page = admin_client.get(ADD).content.decode()

    assert 'name="job_type"' in page
    assert 'name="task"' not in page and 'name="regtask"' not in page
    assert 'name="kwargs"' not in page and 'name="args"' not in page
    assert "Count primes" in page


def test_a_schedule_is_created_from_a_job_type_and_its_parameter_form(admin_client, job_types):
    PeriodicTasks.update_changed()
    before = PeriodicTasks.last_change()

    response = admin_client.post(ADD, form_data(job_types["count_primes"]))

    assert response.status_code == 302, response.content.decode()[:3000]
    task = PeriodicTask.objects.get(name="primes every 10 minutes")
    assert task.task == "jobs.count_primes"
    assert json.loads(task.kwargs) == {"limit": 1000}
    assert task.args == "[]"
    assert (task.queue, task.priority) == ("cpu", 6)
    assert PeriodicTasks.last_change() > before  # beat sees the change
    entry = AuditEntry.objects.get(action=AuditAction.SCHEDULE_CREATE)
    assert entry.target_id == str(task.pk) and entry.actor_name == "root"


def test_a_typed_task_name_is_ignored(admin_client, job_types):
    data = form_data(job_types["count_primes"], task="celery.backend_cleanup", regtask="x")

    response = admin_client.post(ADD, data)

    assert response.status_code == 302
    assert PeriodicTask.objects.get().task == "jobs.count_primes"


def test_invalid_parameters_are_refused_with_a_message_and_nothing_is_saved(
    admin_client, job_types
):
    data = form_data(job_types["count_primes"], **{"params-limit": "1"})

    response = admin_client.post(ADD, data)

    assert response.status_code == 400
    page = response.content.decode()
    assert "The parameters are not valid" in page
    assert "Ensure this value is greater than or equal to 2." in page
    assert not PeriodicTask.objects.exists()
    assert not AuditEntry.objects.exists()


def test_invalid_parameters_on_edit_change_nothing(admin_client, job_types):
    task = make_schedule()
    data = form_data(job_types["count_primes"], name="primes", **{"params-limit": "abc"})

    response = admin_client.post(change_url(task), data)

    assert response.status_code == 400
    assert "Enter a whole number." in response.content.decode()
    task.refresh_from_db()
    assert json.loads(task.kwargs) == {"limit": 1000}


def test_a_queue_the_job_type_does_not_allow_is_refused(admin_client, job_types):
    response = admin_client.post(ADD, form_data(job_types["count_primes"], queue="reports"))

    assert response.status_code == 400
    assert "Select a valid choice" in response.content.decode()
    assert not PeriodicTask.objects.exists()


@pytest.mark.parametrize("priority", ["10", "-1"])
def test_a_priority_outside_0_to_9_is_refused(admin_client, job_types, priority):
    response = admin_client.post(ADD, form_data(job_types["count_primes"], priority=priority))

    assert response.status_code == 400
    assert not PeriodicTask.objects.exists()


@pytest.mark.parametrize(
    "headers", ['{"task": "os.system"}', '{"id": "x"}', '["a"]', "{nope", '{"a": {"b": 1}}']
)
def test_headers_that_are_not_a_flat_object_or_replace_celerys_are_refused(
    admin_client, job_types, headers
):
    response = admin_client.post(ADD, form_data(job_types["count_primes"], headers=headers))

    assert response.status_code == 400
    assert not PeriodicTask.objects.exists()


def test_a_disabled_job_type_cannot_be_chosen(admin_client, job_types):
    job_type = job_types["count_primes"]
    job_type.enabled = False
    job_type.save()

    response = admin_client.post(ADD, form_data(job_type))

    assert response.status_code == 400
    assert not PeriodicTask.objects.exists()


def test_crontab_solar_and_clocked_schedules_are_accepted(admin_client, job_types):
    crontab = CrontabSchedule.objects.create(minute="30", hour="2", timezone="Europe/Berlin")
    solar = SolarSchedule.objects.create(event="sunrise", latitude=52.52, longitude=13.40)
    clocked = ClockedSchedule.objects.create(clocked_time=timezone.now() + timedelta(days=1))
    cases = {
        "cron": {"crontab": str(crontab.pk)},
        "sun": {"solar": str(solar.pk)},
        "once": {"clocked": str(clocked.pk), "one_off": "on"},
    }
    for name, fields in cases.items():
        data = form_data(job_types["count_primes"], name=name, interval="", **fields)
        response = admin_client.post(ADD, data)
        assert response.status_code == 302, (name, response.content.decode()[:3000])
        assert len(schedules.next_runs(PeriodicTask.objects.get(name=name))) >= 1


def test_two_kinds_of_schedule_at_once_are_refused(admin_client, job_types):
    crontab = CrontabSchedule.objects.create(minute="0", hour="*")

    response = admin_client.post(ADD, form_data(job_types["count_primes"], crontab=crontab.pk))

    assert response.status_code == 400
    assert not PeriodicTask.objects.exists()


def test_the_parameter_fragment_follows_the_chosen_job_type(admin_client, job_types):
    url = reverse("admin:django_celery_beat_periodictask_params")

    page = admin_client.get(url, {"job_type": job_types["generate_report"].pk}).content.decode()

    assert 'name="params-rows_per_day"' in page
    assert 'name="params-limit"' not in page
    assert 'hx-swap-oob="true"' in page and '<option value="reports" selected>' in page


def test_the_change_form_shows_the_saved_parameters(admin_client, job_types):
    task = make_schedule(kwargs={"limit": 4242})

    page = admin_client.get(change_url(task)).content.decode()

    assert 'name="params-limit" value="4242"' in page


# --- What a schedule will do, and did ------------------------------------------------


def test_the_change_page_shows_next_runs_words_and_dst_warnings(admin_client, job_types):
    crontab = CrontabSchedule.objects.create(minute="30", hour="2", timezone="Europe/Berlin")
    task = make_schedule(crontab=crontab)

    page = admin_client.get(change_url(task)).content.decode()

    assert "At 02:30 (Europe/Berlin)" in page
    assert page.count('<li><time datetime="') == 5
    # Any coming year of Europe/Berlin has one spring-forward and one fall-back day.
    assert "does not exist in Europe/Berlin (clocks go forward)" in page
    assert "happens twice in Europe/Berlin (clocks go back)" in page


def test_the_change_page_lists_the_schedules_runs_newest_first(admin_client, job_types):
    task = make_schedule()
    now = timezone.now()
    for minutes in (3, 1, 2):
        Job.objects.create(
            id=f"run-{minutes}",
            task_name=task.task,
            schedule=task,
            schedule_name=task.name,
            source=JobSource.BEAT,
            created_at=now - timedelta(minutes=minutes),
        )
    Job.objects.create(id="other", task_name=task.task)

    page = admin_client.get(change_url(task)).content.decode()

    assert page.index("/runs/run-1/") < page.index("/runs/run-2/") < page.index("/runs/run-3/")
    assert "/runs/other/" not in page
    assert "/?schedule=primes" in page


def test_the_list_shows_when_beat_was_last_seen(admin_client, job_types):
    make_schedule()
    heartbeat.beat_seen_now()

    page = admin_client.get(CHANGELIST).content.decode()

    assert "Beat last seen 0 s ago" in page or "Beat last seen 1 s ago" in page
    assert "Every 1 hour" in page or "every hour" in page


def test_the_list_warns_when_beat_is_not_running(admin_client, job_types):
    redis.client().delete(heartbeat.BEAT_KEY)

    page = admin_client.get(CHANGELIST).content.decode()

    assert "Beat is not running: it has never been seen" in page


def test_history_can_be_filtered_by_schedule_name(admin_client, job_types):
    task = make_schedule()
    Job.objects.create(id="from-beat", task_name=task.task, schedule=task, schedule_name="primes")
    Job.objects.create(id="by-hand", task_name=task.task)

    page = admin_client.get(reverse("jobs-history"), {"schedule": "primes"}).content.decode()

    assert "/runs/from-beat/" in page and "/runs/by-hand/" not in page


# --- Enable, disable, delete --------------------------------------------------------------


def test_enable_and_disable_actions_reach_beat_and_are_audited(admin_client, job_types):
    first, second = make_schedule("a"), make_schedule("b")
    PeriodicTasks.objects.update_or_create(
        ident=1, defaults={"last_update": timezone.now() - timedelta(days=1)}
    )
    before = PeriodicTasks.last_change()

    response = admin_client.post(
        CHANGELIST, {"action": "disable_schedules", "_selected_action": [first.pk, second.pk]}
    )

    assert response.status_code == 302
    assert not PeriodicTask.objects.filter(enabled=True).exists()
    assert PeriodicTasks.last_change() > before
    assert AuditEntry.objects.filter(action=AuditAction.SCHEDULE_DISABLE).count() == 2

    admin_client.post(CHANGELIST, {"action": "enable_schedules", "_selected_action": [first.pk]})

    assert list(PeriodicTask.objects.filter(enabled=True).values_list("name", flat=True)) == ["a"]
    assert AuditEntry.objects.filter(action=AuditAction.SCHEDULE_ENABLE).count() == 1


def test_deleting_a_schedule_is_audited_and_its_runs_keep_its_name(admin_client, job_types):
    task = make_schedule()
    Job.objects.create(id="r1", task_name=task.task, schedule=task, schedule_name=task.name)

    response = admin_client.post(
        reverse("admin:django_celery_beat_periodictask_delete", args=[task.pk]), {"post": "yes"}
    )

    assert response.status_code == 302
    assert not PeriodicTask.objects.exists()
    assert Job.objects.get(pk="r1").schedule_name == "primes"
    assert AuditEntry.objects.filter(action=AuditAction.SCHEDULE_DELETE).count() == 1


def test_a_schedule_declared_in_code_is_view_only(admin_client, job_types):
    task = PeriodicTask.objects.create(
        name="celery.backend_cleanup",
        task="celery.backend_cleanup",
        crontab=CrontabSchedule.objects.create(minute="0", hour="4"),
    )

    page = admin_client.get(change_url(task)).content.decode()
    response = admin_client.post(change_url(task), {"name": "x"})

    assert "declared in code" in page
    assert response.status_code == 403


# --- Permissions ------------------------------------------------------------------------


def test_a_view_only_staff_user_can_look_but_not_run_or_change_anything(viewer_client, job_types):
    task = make_schedule()

    listing = viewer_client.get(CHANGELIST)
    page = viewer_client.get(change_url(task))

    assert listing.status_code == 200 and page.status_code == 200
    assert "run_schedules_now" not in listing.content.decode()
    assert "disable_schedules" not in listing.content.decode()
    assert "Run now" not in page.content.decode()
    assert viewer_client.post(run_now_url(task)).status_code == 403
    assert (
        viewer_client.post(change_url(task), form_data(job_types["count_primes"])).status_code
        == 403
    )
    assert viewer_client.get(ADD).status_code == 403
    assert viewer_client.post(ADD, form_data(job_types["count_primes"])).status_code == 403
    params_url = reverse("admin:django_celery_beat_periodictask_params")
    assert viewer_client.get(params_url, {"job_type": 1}).status_code == 403
    delete = reverse("admin:django_celery_beat_periodictask_delete", args=[task.pk])
    assert viewer_client.post(delete, {"post": "yes"}).status_code == 403
    for action in ("run_schedules_now", "disable_schedules", "delete_selected"):
        viewer_client.post(CHANGELIST, {"action": action, "_selected_action": [task.pk]})
    task.refresh_from_db()
    assert task.enabled
    assert not Job.objects.exists()
    assert not AuditEntry.objects.exists()


def test_run_now_is_post_only(admin_client, job_types):
    task = make_schedule()

    assert admin_client.get(run_now_url(task)).status_code == 405
    assert not Job.objects.exists()


# --- Run now, on real brokers -------------------------------------------------------------


@pytest.fixture
def probe_type(job_types):
    """A job type on a queue no worker consumes, so the test reads the raw message."""
    queue = f"probe-{uuid.uuid4().hex[:8]}"
    catalog.register(
        catalog.JobSpec(
            name="probe", task_name="tests.probe", form=PrimesParams, title="Probe",
            queue=queue, queues=(queue,),
        )
    )  # fmt: skip
    job_type = JobType.objects.create(
        name="probe", task_name="tests.probe", title="Probe", queue=queue
    )
    yield job_type
    specs._registry.pop("probe", None)


@pytest.mark.broker
def test_run_now_sends_all_of_the_schedules_options(worker, admin_client, probe_type):
    queue = probe_type.queue
    task = PeriodicTask.objects.create(
        name="probe schedule",
        task="tests.probe",
        kwargs='{"limit": 10}',
        interval=IntervalSchedule.objects.create(every=1, period="days"),
        queue=queue,
        exchange="jobsite-probe",
        routing_key=f"{queue}.key",
        priority=7,
        headers='{"tenant": "acme"}',
        expire_seconds=600,
    )
    binding = Queue(
        queue,
        Exchange("jobsite-probe", type="direct"),
        routing_key=f"{queue}.key",
        queue_arguments={"x-max-priority": 10},
    )
    with celery_app.connection_for_write() as conn:
        with conn.SimpleQueue(binding) as raw:
            response = admin_client.post(run_now_url(task))
            message = raw.get(block=True, timeout=15)
            message.ack()
        binding(conn.default_channel).delete()

    assert response.status_code == 302
    job = Job.objects.get()
    assert message.headers["id"] == job.id and message.headers["task"] == "tests.probe"
    assert message.headers["tenant"] == "acme"
    assert message.headers["periodic_task_name"] == "probe schedule"
    assert message.headers["expires"]
    # Jobsite's 7 on the wire: RabbitMQ as is, Redis mirrored (kombu pops 0 first).
    assert message.properties["priority"] == routing.wire_priority(7, worker.url)
    assert message.delivery_info["exchange"] == "jobsite-probe"
    assert message.delivery_info["routing_key"] == f"{queue}.key"
    assert (job.queue, job.priority, job.sent_at is not None) == (queue, 7, True)


@pytest.mark.broker
def test_run_now_records_a_run_linked_to_the_schedule_and_the_user(
    worker, admin_client, admin_user, job_types
):
    task = make_schedule(queue="cpu", priority=8, kwargs={"limit": 100})

    response = admin_client.post(run_now_url(task), follow=True)

    job = wait_for(Job.objects.get().pk)
    assert job.state == "SUCCESS" and job.result == {"limit": 100, "primes": 25}
    assert job.schedule == task and job.schedule_name == "primes"
    assert job.source == JobSource.SCHEDULE_NOW and job.submitted_by == admin_user
    assert (job.queue, job.priority) == ("cpu", 8)
    assert "Sent “primes” now" in response.content.decode()
    audit = AuditEntry.objects.get(action=AuditAction.SCHEDULE_RUN_NOW)
    assert audit.details["run"] == job.pk and audit.target_id == str(task.pk)


def test_run_now_refuses_a_schedule_whose_parameters_are_no_longer_valid(admin_client, job_types):
    task = make_schedule(kwargs={"limit": "many"})

    response = admin_client.post(run_now_url(task), follow=True)

    assert "parameters are not valid any more" in response.content.decode()
    assert not Job.objects.exists()
