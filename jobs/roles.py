"""The four roles, as Django groups with permissions (created after every migrate).

viewer     read-only: sees every run, changes nothing
submitter  submits the job types granted to the group, sees own runs
operator   sees all runs; cancel/retry/rerun; workers and queues
admin      everything in Jobsite, schedules included (is_staff for the admin site)

Existing groups keep permissions an administrator added; missing ones are added.
"""

from __future__ import annotations

from django.contrib.auth.models import Group, Permission

ROLES: dict[str, list[str]] = {
    "viewer": [
        "jobs.view_all_jobs",
        "jobs.view_job",
        "jobs.view_jobtype",
        "django_celery_beat.view_periodictask",
    ],
    "submitter": ["jobs.view_jobtype"],
    "operator": [
        "jobs.view_all_jobs",
        "jobs.control_jobs",
        "jobs.manage_workers",
        "jobs.view_job",
        "jobs.view_jobtype",
        "jobs.view_auditentry",
        "django_celery_beat.view_periodictask",
    ],
    "admin": [
        "jobs.*",
        "django_celery_beat.*",
        "django_celery_results.view_taskresult",
        "django_celery_results.view_groupresult",
    ],
}


def _permissions(spec: str) -> list[Permission]:
    app_label, codename = spec.split(".", 1)
    qs = Permission.objects.filter(content_type__app_label=app_label)
    return list(qs if codename == "*" else qs.filter(codename=codename))


def setup_roles() -> dict[str, Group]:
    groups = {}
    for name, specs in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.add(*[perm for spec in specs for perm in _permissions(spec)])
        groups[name] = group
    return groups
