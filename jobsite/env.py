"""Reading settings from the environment, with errors that name the variable.

django-environ parses URLs well but silently turns a mistyped boolean ("ture") into
False; these small wrappers refuse bad values instead, so a misconfigured deployment
fails at start-up with a message saying which variable is wrong.
"""

from __future__ import annotations

import os
import zoneinfo
from urllib.parse import urlsplit

import environ
from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str | None = None) -> str:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ImproperlyConfigured(f"Set the {name} environment variable.")
        return default
    return value


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean: use true or false.")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a whole number.") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name}={value!r} must be at least {minimum}.")
    return number


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}.")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_database(name: str, default: str) -> dict:
    url = env_str(name, default)
    scheme = urlsplit(url).scheme
    if scheme not in {"sqlite", "postgres", "postgresql", "pgsql", "mysql", "mariadb"}:
        raise ImproperlyConfigured(
            f"{name}={url!r}: use sqlite:///path, postgres://user@host:port/name or mysql://..."
        )
    try:
        return environ.Env.db_url_config(url)
    except Exception as exc:  # django-environ raises several types for bad URLs
        raise ImproperlyConfigured(f"{name}={url!r} is not a database URL: {exc}") from exc


def env_broker(name: str, default: str) -> str:
    url = env_str(name, default)
    scheme = urlsplit(url).scheme
    if scheme not in {"redis", "rediss", "redis+socket", "amqp", "amqps", "pyamqp"}:
        raise ImproperlyConfigured(
            f"{name}={url!r}: use redis://host:port/db or amqp://user:password@host:port/vhost."
        )
    return url


def env_redis(name: str, default: str) -> str:
    url = env_str(name, default)
    if urlsplit(url).scheme not in {"redis", "rediss", "unix"}:
        raise ImproperlyConfigured(f"{name}={url!r}: use redis://host:port/db or unix:///path.")
    return url


def env_timezone(name: str, default: str) -> str:
    value = env_str(name, default)
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ImproperlyConfigured(f"{name}={value!r} is not a known time zone.") from None
    return value
