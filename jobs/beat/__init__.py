"""What runs inside Celery beat: Jobsite's scheduler (one leader, send-ahead).

``CELERY_BEAT_SCHEDULER = "jobs.beat:JobsiteScheduler"``; it overrides private
attributes of django-celery-beat's DatabaseScheduler, listed in docs/internals.md.
"""

from jobs.beat.scheduler import JobsiteScheduler

__all__ = ["JobsiteScheduler"]
