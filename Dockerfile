# Image for every Jobsite process: the web server (default CMD), the Celery worker,
# Celery beat and the one-shot migrate job all run from it (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JOBSITE_MEDIA_ROOT=/app/var/media

RUN groupadd --system --gid 1000 jobsite \
 && useradd --system --uid 1000 --gid jobsite --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin jobsite

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# Code stays owned by root (read-only for the app user); only var/ is writable.
COPY . .

# Static files are baked into the image and served by whitenoise. The secret key is a
# placeholder that exists only for this build step; compose supplies the real one.
# The media directory is created owned by the app user, so a fresh named volume
# mounted on it inherits that ownership and the app can write uploads.
RUN DJANGO_SECRET_KEY=build-only-collectstatic-placeholder-not-a-secret-0123456789 DJANGO_DEBUG=false \
        python manage.py collectstatic --noinput \
 && mkdir -p "$JOBSITE_MEDIA_ROOT" \
 && chown -R jobsite:jobsite /app/var

USER jobsite

EXPOSE 8000

CMD ["gunicorn", "jobsite.wsgi", "--bind", "0.0.0.0:8000", "--workers", "3", "--access-logfile", "-"]
