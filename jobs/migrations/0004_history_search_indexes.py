"""Indexes for the dashboard at scale, and trigram indexes for history search.

The trigram (pg_trgm) GIN indexes exist on PostgreSQL only: they serve the history
search's ``UPPER(params::text) LIKE UPPER('%…%')`` and the same on ``error_message``
(Django's ``icontains``). They are built CONCURRENTLY, so a deployment with millions
of runs keeps accepting writes meanwhile; hence ``atomic = False``.
"""

from django.conf import settings
from django.db import migrations, models

TRIGRAM_INDEXES = {
    "job_params_trgm": "(UPPER(params::text)) gin_trgm_ops",
    "job_error_trgm": "(UPPER(error_message)) gin_trgm_ops",
}


def create_trigram_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    for name, expression in TRIGRAM_INDEXES.items():
        schema_editor.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON jobs_job USING gin ({expression})"
        )


def drop_trigram_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name in TRIGRAM_INDEXES:
        schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("django_celery_beat", "0019_alter_periodictasks_options"),
        ("jobs", "0003_retention_and_rejected_messages"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddIndex(
            model_name="job",
            index=models.Index(
                condition=models.Q(("finished_at__isnull", False)),
                fields=["finished_at", "state"],
                name="job_finished",
            ),
        ),
        migrations.AddIndex(
            model_name="job",
            index=models.Index(
                condition=models.Q(("started_at__isnull", False)),
                fields=["created_at"],
                include=("task_name", "started_at", "finished_at", "eta"),
                name="job_started_timings",
            ),
        ),
        migrations.RunPython(create_trigram_indexes, drop_trigram_indexes, elidable=False),
    ]
