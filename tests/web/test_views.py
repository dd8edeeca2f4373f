"""History and run pages: who sees what, filters, search, cursor pagination."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from jobs.models import Job


def make_job(user, job_type, **fields) -> Job:
    n = Job.objects.count()
    defaults = {
        "id": f"{n:08x}-0000-4000-8000-000000000000",
        "task_name": job_type.task_name,
        "job_type": job_type,
        "submitted_by": user,
        "created_at": timezone.now() - timedelta(seconds=1000 - n),
        "queue": job_type.queue,
    }
    return Job.objects.create(**{**defaults, **fields})


@pytest.fixture
def runs(alice, bob, job_types):
    primes, mail = job_types["count_primes"], job_types["send_mail"]
    return {
        "alice_ok": make_job(alice, primes, state="SUCCESS", params={"limit": 10}),
        "alice_failed": make_job(alice, mail, state="FAILURE", error_message="SMTP refused"),
        "bob_ok": make_job(bob, primes, state="SUCCESS", params={"limit": 777}),
    }


def history(client, **params):
    response = client.get(reverse("jobs-history"), params)
    assert response.status_code == 200
    return [job.id for job in response.context["page"].rows]


def test_a_user_sees_only_their_own_runs(alice_client, runs):
    assert history(alice_client) == [runs["alice_failed"].id, runs["alice_ok"].id]


def test_a_user_cannot_open_another_users_run(alice_client, runs):
    assert alice_client.get(runs["bob_ok"].get_absolute_url()).status_code == 404
    assert alice_client.get(reverse("jobs-download", args=[runs["bob_ok"].id])).status_code == 404


def test_view_all_jobs_permission_shows_everyones_runs(client, alice, runs):
    alice.user_permissions.add(Permission.objects.get(codename="view_all_jobs"))
    client.force_login(alice)

    assert len(history(client)) == 3
    assert client.get(runs["bob_ok"].get_absolute_url()).status_code == 200


def test_history_filters_by_state_and_job_type(alice_client, runs):
    assert history(alice_client, state="FAILURE") == [runs["alice_failed"].id]
    assert history(alice_client, job_type="count_primes") == [runs["alice_ok"].id]


def test_history_searches_id_prefix_parameters_and_errors(client, admin_user, runs):
    client.force_login(admin_user)

    assert history(client, q=runs["bob_ok"].id[:8]) == [runs["bob_ok"].id]
    assert history(client, q="777") == [runs["bob_ok"].id]
    assert history(client, q="smtp refused") == [runs["alice_failed"].id]


def test_an_invalid_filter_value_shows_no_runs_and_the_error(alice_client, runs):
    response = alice_client.get(reverse("jobs-history"), {"state": "EXPLODED"})

    assert response.status_code == 200
    assert list(response.context["page"].rows) == []
    assert "Select a valid choice" in response.content.decode()


def test_cursor_pagination_walks_every_run_once_newest_first(
    client, admin_user, job_types, settings
):
    settings.JOBSITE_PAGE_SIZE = 4
    same_time = timezone.now()
    made = [
        make_job(
            admin_user,
            job_types["count_primes"],
            # Several runs share one timestamp: the id breaks the tie.
            created_at=same_time if i % 3 else same_time - timedelta(seconds=i),
        )
        for i in range(10)
    ]
    client.force_login(admin_user)

    seen, cursor = [], None
    for _ in range(5):
        response = client.get(reverse("jobs-history"), {"cursor": cursor} if cursor else {})
        seen += [job.id for job in response.context["page"].rows]
        cursor = response.context["page"].next_cursor
        if not cursor:
            break

    expected = sorted(made, key=lambda j: (j.created_at, j.id), reverse=True)
    assert seen == [job.id for job in expected]


def test_a_forged_cursor_is_a_400(alice_client, runs):
    assert alice_client.get(reverse("jobs-history"), {"cursor": "bm9wZQ"}).status_code == 400


def test_the_history_fragment_refreshes_without_the_page_shell(alice_client, runs):
    response = alice_client.get(reverse("jobs-history"), headers={"HX-Request": "true"})

    body = response.content.decode()
    assert "<html" not in body
    assert runs["alice_ok"].id[:13] in body


def test_the_run_page_shows_parameters_as_json_and_escapes_html(alice_client, alice, job_types):
    job = make_job(
        alice,
        job_types["send_mail"],
        state="FAILURE",
        params={"to": "x@example.com", "subject": "<script>alert(1)</script>"},
        traceback="Traceback <img src=x onerror=alert(1)>",
    )

    page = alice_client.get(job.get_absolute_url()).content.decode()

    assert "&quot;subject&quot;: &quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in page
    assert "<script>alert(1)" not in page
    assert "<img src=x" not in page


def test_a_history_row_escapes_what_users_and_workers_wrote(client, admin_user, alice, job_types):
    started = timezone.now() - timedelta(seconds=3)
    make_job(alice, job_types["count_primes"], id="<i>&\"q'-0000-4000-8000-000000000000",
             state="PROGRESS", queue="q&<x>", progress_current=3, progress_total=7,
             started_at=started, finished_at=started + timedelta(seconds=1.234))  # fmt: skip
    Job.objects.create(id="from-elsewhere", task_name="x.<script>alert(1)</script>",
                       state="FAILURE", source="beat")  # fmt: skip
    client.force_login(admin_user)

    html = client.get(reverse("jobs-history"), {"state": "PROGRESS"}).content.decode()
    assert 'value="&lt;i&gt;&amp;&quot;q&#x27;-0000-4000-8000-000000000000"' in html
    assert 'class="mono">&lt;i&gt;&amp;&quot;q&#x27;-0000…</a>' in html  # 13 characters
    assert "<i>" not in html
    assert "<td>Count primes</td>" in html
    assert '<span class="state state-progress">In progress</span>' in html
    assert '<progress max="100" value="43">43%</progress>' in html
    assert "<td>q&amp;&lt;x&gt;</td>" in html
    assert "<td>alice</td>" in html
    assert "<td>1.23 s</td>" in html

    html = client.get(reverse("jobs-history"), {"state": "FAILURE"}).content.decode()
    assert '<span class="mono">x.&lt;script&gt;alert(1)&lt;/script&gt;</span>' in html
    assert '<span class="muted">Schedule (beat)</span>' in html  # no submitter: its source
