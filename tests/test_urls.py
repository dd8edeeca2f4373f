"""Security checks over the whole URLconf: login everywhere, CSRF everywhere, staff admin."""

import uuid

import pytest
from django.test import Client
from django.urls import NoReverseMatch, URLPattern, URLResolver, get_resolver, reverse

PUBLIC = {"healthz", "login", "logout", "admin:login", "admin:logout"}
SAMPLES = {
    "job_id": str(uuid.uuid4()),
    "name": "count_primes",
    "action": "cancel",
    "object_id": "1",
    "pk": "1",
    "app_label": "jobs",
    "model_name": "job",
    "content_type_id": "1",
    "id": "1",
    "url": "x",
    "path": "x",
}


def _walk(patterns, namespace=""):
    for entry in patterns:
        if isinstance(entry, URLResolver):
            ns = f"{namespace}{entry.namespace}:" if entry.namespace else namespace
            yield from _walk(entry.url_patterns, ns)
        elif isinstance(entry, URLPattern) and entry.name:
            yield f"{namespace}{entry.name}", entry


def all_urls() -> dict[str, str]:
    """Every named URL of the project, reversed with sample arguments."""
    urls = {}
    for name, pattern in _walk(get_resolver().url_patterns):
        keys = list(pattern.pattern.regex.groupindex)
        try:
            urls[name] = reverse(name, kwargs={k: SAMPLES.get(k, "1") for k in keys})
        except NoReverseMatch:
            continue
    return urls


def test_the_walk_finds_the_whole_urlconf():
    urls = all_urls()
    assert {"jobs-history", "jobs-submit", "jobs-detail", "jobs-workers", "jobs-queues",
            "admin:index", "admin:jobs_job_changelist"} <= set(urls)  # fmt: skip
    assert len(urls) > 60


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["get", "post"])
def test_anonymous_requests_to_every_url_are_sent_to_login_or_refused(method):
    client = Client()
    allowed = []
    for name, url in all_urls().items():
        if name in PUBLIC:
            continue
        response = getattr(client, method)(url)
        location = response.headers.get("Location", "")
        redirected = response.status_code == 302 and "login" in location
        if not (redirected or response.status_code in (401, 403, 405)):
            allowed.append((name, url, response.status_code))
    assert allowed == []


@pytest.mark.django_db
def test_every_post_without_a_csrf_token_is_refused(admin_user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    accepted = []
    for name, url in all_urls().items():
        response = client.post(url, {"action": "cancel"})
        if response.status_code not in (403, 405):
            accepted.append((name, url, response.status_code))
    assert accepted == []


@pytest.mark.django_db
def test_the_admin_is_for_staff_only(client, alice):
    client.force_login(alice)

    response = client.get(reverse("admin:index"))

    assert response.status_code == 302
    assert reverse("admin:login") in response["Location"]


SECRET = "Tr0ub4dor-3-horse"


@pytest.mark.django_db
def test_no_admin_page_shows_a_viewer_staff_user_a_secret(client, admin_user, job_types):
    import json

    from django.contrib import admin
    from django.contrib.admin.utils import quote
    from django.contrib.auth.models import Permission, User
    from django_celery_beat.models import IntervalSchedule, PeriodicTask
    from django_celery_results.models import TaskResult

    from jobs import services
    from jobs.models import AlertRule

    params = {"service": "billing-db", "new_password": SECRET}
    run = services.job_submit(job_type=job_types["rotate_credentials"], params=params,
                              user=admin_user)  # fmt: skip
    TaskResult.objects.create(task_id=run.pk, task_name=run.task_name, status="SUCCESS",
                              task_kwargs=json.dumps(repr(params)))  # fmt: skip
    every_day = IntervalSchedule.objects.create(every=1, period="days")
    PeriodicTask.objects.create(name="rotate", task=run.task_name, kwargs=json.dumps(params),
                                interval=every_day)  # fmt: skip
    AlertRule.objects.create(name="ops", webhook_secret=SECRET)
    viewer = User.objects.create_user("staff-viewer", password="x", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__startswith="view_"))
    client.force_login(viewer)
    seen, leaks = 0, []
    for model, _ in admin.site._registry.items():
        prefix = f"admin:{model._meta.app_label}_{model._meta.model_name}"
        urls = [reverse(f"{prefix}_changelist")] + [
            reverse(f"{prefix}_change", args=[quote(pk)])
            for pk in model._default_manager.values_list("pk", flat=True)[:5]
        ]
        for url in urls:
            response = client.get(url)
            seen += response.status_code == 200
            if SECRET in response.content.decode():
                leaks.append(url)
    assert leaks == []
    assert seen > 15  # the walk did open the pages (run, result, schedule, audit, ...)
