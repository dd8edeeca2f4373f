"""Celery tasks: the demo job types, workflow steps, benchmark and maintenance tasks.

Importing this package declares them all (JobsConfig.ready); task names are explicit
(``jobs.<function>`` for job types, ``jobsite.<name>`` for Jobsite's own) and do not
depend on the module a task lives in.
"""

from jobs.tasks import benchmark, demo, maintenance, steps, workflows

__all__ = ["benchmark", "demo", "maintenance", "steps", "workflows"]
