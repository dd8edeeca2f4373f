"""Settings for the test suite: the real local services, by environment variables.

Defaults point at this machine's PostgreSQL, Redis and RabbitMQ on their standard
ports; override with DATABASE_URL, TEST_REDIS_URL, TEST_RABBITMQ_URL, JOBSITE_REDIS_URL.
"""

import os
import tempfile

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
os.environ.setdefault("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
os.environ.setdefault("CELERY_BROKER_URL", os.environ["TEST_REDIS_URL"])
os.environ.setdefault("JOBSITE_REDIS_URL", "redis://127.0.0.1:6379/14")
os.environ.setdefault("DJANGO_SECRET_KEY", "tests-only-" + "s3cret" * 10)
os.environ.setdefault("DJANGO_DEBUG", "false")
# Tests submit far more than a person would; the throttle tests set their own rate.
os.environ.setdefault("JOBSITE_SUBMIT_RATE", "100000/min")
os.environ.setdefault("DJANGO_SECURE_SSL_REDIRECT", "false")
os.environ.setdefault("DJANGO_EMAIL_BACKEND", "django.core.mail.backends.locmem.EmailBackend")
os.environ.setdefault(
    "JOBSITE_MEDIA_ROOT", os.path.join(tempfile.gettempdir(), "jobsite-test-media")
)

from jobsite.settings import *  # noqa: F403

ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    **STORAGES,  # noqa: F405
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # noqa: F405 (whitenoise warns if it is missing)
