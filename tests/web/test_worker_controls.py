"""Worker controls (rate/time limits, autoscale, pool restart) and cancel by task name.

Input and permission checks need no broker: the workers page reads a list of workers
put in the cache (what it would have cached from the remote control). The happy paths
talk to the real shared Redis worker and restore what they change.
"""

from __future__ import annotations

import socket

import pytest
from django.contrib.auth.models import Permission, User
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from jobs import markers
from jobs.models import AuditAction, AuditEntry, AuditOutcome, Job
from jobs.selectors import workers as worker_info
from jobsite.celery import app as celery_app
from tests.conftest import run

WORKER = "w1@example"


def url(control: str) -> str:
    return reverse("jobs-worker-control", args=[control])


@pytest.fixture
def manager(db) -> User:
    user = User.objects.create_user("mona", password="mona-pass")
    user.user_permissions.add(Permission.objects.get(codename="manage_workers"))
    return user


@pytest.fixture
def controller(db) -> User:
    """Sees everyone's runs and may control them; no worker controls."""
    user = User.objects.create_user("carl", password="carl-pass")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["control_jobs", "view_all_jobs"])
    )
    return user


@pytest.fixture
def one_worker() -> None:
    cache.set(worker_info.INSPECT_CACHE_KEY, [worker_info.WorkerInfo(name=WORKER)], 60)


def audits(action: str) -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(action=action).order_by("id"))


# --- The page ----------------------------------------------------------------------------


def test_the_workers_page_offers_each_control_with_a_csrf_token(client, manager, one_worker):
    client.force_login(manager)

    page = client.get(reverse("jobs-workers")).content.decode()

    for control in ("rate_limit", "time_limit", "autoscale", "pool_restart"):
        form = page.split(f'action="{url(control)}"', 1)[1].split("</form>", 1)[0]
        assert "csrfmiddlewaretoken" in form and f'value="{WORKER}"' in form
    assert '<option value="jobs.noop">jobs.noop</option>' in page
    assert "hx-preserve" in page  # the 5 s refresh keeps what is being typed


# --- Bad input: a clear 400, nothing sent, nothing audited -----------------------------


@pytest.mark.parametrize(
    ("control", "data", "message"),
    [
        ("rate_limit", {"task_name": "jobs.noop", "rate_limit": "ten"}, "is not a rate limit"),
        ("rate_limit", {"task_name": "jobs.noop", "rate_limit": "10/d"}, "N/s, N/m or N/h"),
        ("rate_limit", {"task_name": "jobs.noop", "rate_limit": "-1/m"}, "is not a rate limit"),
        ("rate_limit", {"task_name": "os.system", "rate_limit": "1/m"}, "Unknown task"),
        ("rate_limit", {"rate_limit": "1/m"}, "Task: This field is required."),
        ("time_limit", {"task_name": "jobs.noop", "soft": "60", "hard": "30"}, "must be shorter"),
        ("time_limit", {"task_name": "jobs.noop", "soft": "60", "hard": "60"}, "must be shorter"),
        ("time_limit", {"task_name": "jobs.noop", "soft": "0"}, "greater than or equal to 1"),
        ("time_limit", {"task_name": "jobs.noop", "hard": "1.5"}, "Enter a whole number"),
        ("time_limit", {"task_name": "celery.chord_unlock", "hard": "5"}, "Unknown task"),
        ("autoscale", {"maximum": "2", "minimum": "3"}, "must not be more than the maximum"),
        ("autoscale", {"maximum": "0", "minimum": "0"}, "greater than or equal to 1"),
        ("autoscale", {"maximum": "4"}, "Min processes: This field is required."),
    ],
)
def test_bad_input_is_a_400_that_says_why_and_sends_nothing(
    client, manager, one_worker, control, data, message
):
    client.force_login(manager)

    # Not marked `broker`: sending anything would fail the test.
    response = client.post(url(control), {"worker": WORKER, **data})

    assert response.status_code == 400
    assert message in response.content.decode()
    assert "Nothing changed" in response.content.decode()
    assert not AuditEntry.objects.exists()


def test_a_rejected_value_is_shown_escaped(client, manager, one_worker):
    client.force_login(manager)

    response = client.post(
        url("rate_limit"), {"worker": WORKER, "task_name": "jobs.noop", "rate_limit": "<b>x"}
    )

    assert response.status_code == 400
    assert "&lt;b&gt;x" in response.content.decode()
    assert "<b>x" not in response.content.decode()


def test_an_unknown_control_is_a_404(client, manager):
    client.force_login(manager)

    assert client.post(url("shutdown_all"), {"worker": WORKER}).status_code == 404


# --- Permissions ---------------------------------------------------------------------------


@pytest.mark.parametrize("control", ["rate_limit", "time_limit", "autoscale", "pool_restart"])
def test_anonymous_is_sent_to_log_in(client, control):
    response = client.post(url(control), {"worker": WORKER})

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


@pytest.mark.parametrize(
    ("control", "action"),
    [
        ("rate_limit", AuditAction.RATE_LIMIT),
        ("time_limit", AuditAction.TIME_LIMIT),
        ("autoscale", AuditAction.AUTOSCALE),
        ("pool_restart", AuditAction.POOL_RESTART),
    ],
)
def test_a_user_without_manage_workers_is_refused_and_audited(client, alice, control, action):
    client.force_login(alice)

    # Refused before the input is read: even bad input is a 403, not a 400.
    response = client.post(url(control), {"worker": WORKER, "task_name": "jobs.noop"})

    assert response.status_code == 403
    [entry] = audits(action)
    assert (entry.outcome, entry.actor, entry.target_id) == (AuditOutcome.DENIED, alice, WORKER)


def test_a_post_without_csrf_token_is_refused(manager):
    client = Client(enforce_csrf_checks=True)
    client.force_login(manager)

    response = client.post(
        url("rate_limit"), {"worker": WORKER, "task_name": "jobs.noop", "rate_limit": "1/m"}
    )

    assert response.status_code == 403
    assert not AuditEntry.objects.exists()


# --- Against the real worker ---------------------------------------------------------------


def node(worker) -> str:
    return f"{worker.name}@{socket.gethostname()}"


@pytest.mark.broker
def test_a_rate_limit_and_time_limits_reach_the_worker_and_are_audited(
    client, manager, redis_worker
):
    client.force_login(manager)
    target = node(redis_worker)

    def registered() -> list[str]:
        # Celery's own report of the worker's task attributes (`celery inspect registered`).
        inspect = celery_app.control.inspect(destination=[target], timeout=2, limit=1)
        return inspect.registered("rate_limit", "soft_time_limit", "time_limit")[target]

    try:
        limited = client.post(
            url("rate_limit"), {"worker": target, "task_name": "jobs.noop", "rate_limit": "900/m"}
        )
        timed = client.post(
            url("time_limit"),
            {"worker": target, "task_name": "jobs.noop", "soft": "50", "hard": "55"},
        )
        assert limited.status_code == timed.status_code == 302
        assert "jobs.noop [rate_limit=900/m soft_time_limit=50 time_limit=55]" in registered()
    finally:
        client.post(url("rate_limit"), {"worker": target, "task_name": "jobs.noop"})
        client.post(url("time_limit"), {"worker": target, "task_name": "jobs.noop"})
    assert "jobs.noop" in registered()  # back to no limits at all

    page = client.get(reverse("jobs-workers"), follow=True).content.decode()
    assert "Rate limit changed" in page or "Time limits changed" in page
    rate = audits(AuditAction.RATE_LIMIT)
    assert [(e.outcome, e.details["rate_limit"]) for e in rate] == [("ok", "900/m"), ("ok", None)]
    assert rate[0].details["replies"] == [{target: {"ok": "new rate limit set successfully"}}]
    timing = audits(AuditAction.TIME_LIMIT)
    assert [(e.details["soft"], e.details["hard"]) for e in timing] == [(50, 55), (None, None)]


@pytest.mark.broker
def test_autoscale_and_pool_restart_refused_by_the_worker_say_so(client, manager, redis_worker):
    client.force_login(manager)
    target = node(redis_worker)

    scaled = client.post(url("autoscale"), {"worker": target, "maximum": 3, "minimum": 1})
    restarted = client.post(url("pool_restart"), {"worker": target}, follow=True)

    assert scaled.status_code == 302
    page = restarted.content.decode()
    assert f"{target} refused: Pool restarts not enabled" in page
    assert "CELERY_WORKER_POOL_RESTARTS" in page
    [scale] = audits(AuditAction.AUTOSCALE)
    assert scale.outcome == AuditOutcome.FAILED
    assert scale.details["error"].startswith(f"{target} refused: Autoscale not enabled.")
    [restart] = audits(AuditAction.POOL_RESTART)
    assert restart.outcome == AuditOutcome.FAILED


@pytest.mark.broker
def test_a_worker_that_does_not_answer_is_a_failure(client, manager, live_broker):
    live_broker("redis")
    client.force_login(manager)

    response = client.post(url("pool_restart"), {"worker": "nobody@nowhere"}, follow=True)

    assert "nobody@nowhere did not answer within 2 s" in response.content.decode()
    [entry] = audits(AuditAction.POOL_RESTART)
    assert entry.outcome == AuditOutcome.FAILED


# --- Cancel by task name -------------------------------------------------------------------

REVOKE = reverse("jobs-revoke-by-name")


@pytest.fixture
def mix(alice, bob, job_types):
    noop, primes = job_types["noop"], job_types["count_primes"]
    return {
        "waiting": [run(alice, noop, "PENDING"), run(bob, noop, "RECEIVED")],
        "retrying": run(bob, noop, "RETRY"),
        "running": run(alice, noop, "STARTED", runtime=None),
        "done": run(alice, noop, "SUCCESS", runtime=1.0),
        "other_task": run(alice, primes, "PENDING"),
    }


@pytest.mark.broker
def test_cancel_by_name_cancels_every_waiting_run_of_that_task(
    client, controller, mix, live_broker
):
    live_broker("redis")
    client.force_login(controller)
    page = client.get(REVOKE).content.decode()
    assert '<tr data-task="jobs.noop"><td class="mono">jobs.noop</td><td class="num">3' in page

    response = client.post(REVOKE, {"task_name": "jobs.noop"}, follow=True)

    text = response.content.decode()
    assert "jobs.noop: cancelled 3 waiting run(s); 1 already running left alone" in text
    cancelled = [*mix["waiting"], mix["retrying"]]
    for job in cancelled:
        job.refresh_from_db()
        assert job.state == "REVOKED" and "every run of jobs.noop" in job.error_message
        assert markers.is_revoked_marker(job.pk)
    untouched = [mix["running"], mix["done"], mix["other_task"]]
    assert [Job.objects.get(pk=j.pk).state for j in untouched] == ["STARTED", "SUCCESS", "PENDING"]
    [entry] = audits(AuditAction.REVOKE_BY_NAME)
    assert (entry.outcome, entry.target_id, entry.details["cancelled"]) == ("ok", "jobs.noop", 3)
    assert sorted(entry.details["cancelled_runs"]) == sorted(j.pk for j in cancelled)


@pytest.mark.broker
def test_cancel_by_name_is_scoped_to_the_runs_the_user_sees(client, alice, bob, mix, live_broker):
    live_broker("redis")
    alice.user_permissions.add(Permission.objects.get(codename="control_jobs"))
    client.force_login(alice)

    response = client.post(REVOKE, {"task_name": "jobs.noop"}, follow=True)

    assert "cancelled 1 waiting run(s)" in response.content.decode()
    [mine] = [job for job in mix["waiting"] if job.submitted_by == alice]
    assert Job.objects.get(pk=mine.pk).state == "REVOKED"
    bobs = Job.objects.filter(submitted_by=bob).values_list("state", flat=True)
    assert sorted(bobs) == ["RECEIVED", "RETRY"]


def test_cancel_by_name_rejects_an_unknown_task(client, controller, mix):
    client.force_login(controller)

    response = client.post(REVOKE, {"task_name": "jobs.noop; rm -rf"})

    assert response.status_code == 400
    assert "Unknown task “jobs.noop; rm -rf”" in response.content.decode()
    assert Job.objects.filter(state="REVOKED").count() == 0
    assert not AuditEntry.objects.exists()


def test_cancel_by_name_needs_control_jobs_and_audits_the_refusal(client, alice, mix):
    client.force_login(alice)

    assert client.get(REVOKE).status_code == 403
    response = client.post(REVOKE, {"task_name": "jobs.noop"})

    assert response.status_code == 403
    [entry] = audits(AuditAction.REVOKE_BY_NAME)
    assert (entry.outcome, entry.actor, entry.target_id) == ("denied", alice, "jobs.noop")
    assert Job.objects.filter(state="REVOKED").count() == 0


def test_cancel_by_name_anonymous_and_without_csrf_are_refused(client, controller, mix):
    assert client.post(REVOKE, {"task_name": "jobs.noop"})["Location"].startswith(reverse("login"))
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(controller)

    assert strict.post(REVOKE, {"task_name": "jobs.noop"}).status_code == 403
    assert Job.objects.filter(state="REVOKED").count() == 0
