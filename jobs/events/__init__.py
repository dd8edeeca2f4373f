"""The event recorder: Celery task events of every worker, into Jobsite's history.

``manage.py record_events`` runs :class:`jobs.events.recorder.Recorder`; what it stores
and how runs are merged is jobs.services.events.
"""
