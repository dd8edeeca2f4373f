"""Celery tasks: Jobsite's maintenance tasks and the workflows' errback, always; the demo
job types, workflow steps and templates and the benchmark tasks when
JOBSITE_DEMO_JOB_TYPES is on (the ready-made site's default; off in a project that adds
the app, whose own job types are in its apps' ``tasks`` modules).

Task names are explicit (``jobs.<function>`` for job types, ``jobsite.<name>`` for
Jobsite's own) and do not depend on the module a task lives in.
"""

from django.conf import settings

from jobs.tasks import errbacks, maintenance

__all__ = ["errbacks", "maintenance"]

if settings.JOBSITE_DEMO_JOB_TYPES:
    from jobs.tasks import benchmark, demo, steps, workflows

    __all__ += ["benchmark", "demo", "steps", "workflows"]
