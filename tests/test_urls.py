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
