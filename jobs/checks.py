"""System checks (``manage.py check``): what a project needs for Jobsite, with a hint each.

Errors stop ``runserver``/``migrate``; warnings say what Jobsite does without a piece.
"""

from __future__ import annotations

from django.apps import apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.urls import NoReverseMatch, reverse

REQUIRED_APPS = {
    "django.contrib.admin": "the schedules and job types are edited in the admin",
    "django.contrib.auth": "every page needs a login",
    "django.contrib.humanize": "pages show figures with it",
    "django_htmx": "pages update live with htmx",
    "django_celery_beat": "schedules are django-celery-beat's PeriodicTask rows",
    "django_celery_results": "results are django-celery-results' TaskResult rows",
    "rest_framework": "the JSON API is Django REST framework",
    "drf_spectacular": "the API's OpenAPI schema",
    "drf_spectacular_sidecar": "Swagger UI served without a CDN",
}
REQUIRED_MIDDLEWARE = {
    "django.contrib.auth.middleware.LoginRequiredMiddleware": (
        "Jobsite's pages rely on it for 'login everywhere': without it they are public"
    ),
    "django_htmx.middleware.HtmxMiddleware": "live pages read request.htmx",
}


@register(Tags.compatibility)
def check_apps_and_middleware(app_configs=None, **kwargs) -> list:
    problems: list[CheckMessage] = []
    for index, (name, why) in enumerate(REQUIRED_APPS.items(), start=1):
        if not apps.is_installed(name):
            problems.append(
                Error(
                    f"{name} is not in INSTALLED_APPS ({why}).",
                    hint=f'Add "{name}" to INSTALLED_APPS.',
                    id=f"jobs.E00{index}" if index < 10 else f"jobs.E0{index}",
                )
            )
    middleware = list(getattr(settings, "MIDDLEWARE", []))
    for index, (name, why) in enumerate(REQUIRED_MIDDLEWARE.items(), start=1):
        if name not in middleware:
            problems.append(
                Error(
                    f"{name} is not in MIDDLEWARE ({why}).",
                    hint=f'Add "{name}" to MIDDLEWARE, after AuthenticationMiddleware.',
                    id=f"jobs.E02{index}",
                )
            )
    return problems


@register(Tags.urls)
def check_urls(app_configs=None, **kwargs) -> list:
    try:
        reverse("jobs-dashboard")
        reverse("api-run-list")
    except NoReverseMatch:
        return [
            Error(
                "Jobsite's URLs are not in the URLconf.",
                hint='Add path("jobs/", include("jobs.urls")) (or "") to your urlpatterns.',
                id="jobs.E031",
            )
        ]
    return []


@register()
def check_celery(app_configs=None, **kwargs) -> list:
    from celery import current_app

    from jobs import celery as wiring

    # The app itself, not the proxy: install() remembers apps, not proxies.
    app = current_app._get_current_object()  # type: ignore[attr-defined]  # a Proxy
    if not wiring.installed(app):
        return [
            Error(
                f"The Celery app {app.main or app!r} is not wired to Jobsite.",
                hint="Call jobs.celery.install(app) in your Celery module, after "
                "config_from_object(), and import that module in your project's "
                "__init__.py (Celery's Django guide does).",
                id="jobs.E041",
            )
        ]
    conf = app.conf
    problems: list[CheckMessage] = []
    for key, expected in wiring.REQUIRED.items():
        value = conf.get(key)
        if key == "accept_content":
            if "pickle" in (value or []):
                problems.append(
                    Error(
                        "accept_content allows pickle: a message could run any code.",
                        hint="CELERY_ACCEPT_CONTENT = ['json'] (or msgpack).",
                        id="jobs.E042",
                    )
                )
        elif key in ("task_track_started", "result_extended") and value is not expected:
            problems.append(
                Error(
                    f"Celery's {key} is {value!r}; Jobsite's tracking needs True.",
                    hint=f"Remove CELERY_{key.upper()} from your settings (install sets it).",
                    id="jobs.E043" if key == "task_track_started" else "jobs.E044",
                )
            )
    pieces = (
        ("result_backend", wiring.RESULT_BACKEND, "runs' states are not tracked", Error, 45),
        ("worker_consumer", wiring.WORKER_CONSUMER, "no message size limit", Warning, 46),
        ("beat_scheduler", wiring.BEAT_SCHEDULER, "more than one beat may fire", Warning, 47),
    )
    for key, ours, consequence, level, number in pieces:
        value = conf.get(key)
        if not _is_or_extends(value, ours):
            problems.append(
                level(
                    f"Celery's {key} is {value!r}, not Jobsite's {ours}: {consequence}.",
                    hint=f"Leave {key} to jobs.celery.install(app), or subclass {ours}.",
                    id=f"jobs.{'E' if level is Error else 'W'}0{number}",
                )
            )
    return problems


def _is_or_extends(value, ours: str) -> bool:
    if not value:
        return False
    if value == ours:
        return True
    from celery.utils.imports import symbol_by_name

    try:
        ours_class = symbol_by_name(ours)
        theirs = symbol_by_name(value) if isinstance(value, str) else value
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(theirs, type) and issubclass(theirs, ours_class)
