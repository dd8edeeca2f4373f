"""The Django admin: run records, job types, alerts, tokens (records) and schedules."""

from jobs.admin import records, schedules

__all__ = ["records", "schedules"]
