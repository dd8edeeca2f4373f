"""The catalogue's declarations mirrored into the JobType table."""

from __future__ import annotations

from jobs import specs
from jobs.models import JobType


def jobtypes_sync() -> int:
    """Create a JobType row for every declared job type that has none yet.

    Existing rows keep what staff edited; only the task name follows the code.
    Returns how many rows were created.
    """
    created = 0
    for spec in specs.all_specs():
        obj, was_created = JobType.objects.get_or_create(name=spec.name, defaults=spec.defaults())
        created += was_created
        if not was_created and obj.task_name != spec.task_name:
            obj.task_name = spec.task_name
            obj.save(update_fields=["task_name", "updated_at"])
    return created
