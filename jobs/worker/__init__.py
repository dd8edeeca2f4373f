"""What runs inside Celery's worker: the task base class and everything it sets going.

Nothing here is imported by the web side. Several modules extend or replace private
Celery/kombu internals on the hot path; each such override is listed in
docs/internals.md with the contract test that pins it.

- task: JobTask, the base class of catalogued tasks (cancel check, duplicate guard,
  retries with the run's own limits), and report_progress/result_file_path for jobs;
- tracking: Celery's lifecycle turned into Job state;
- logs: the per-run log capture, masked;
- backend: the result backend (django-celery-results' plus the Job row, one statement);
- commit: the group commit of successful runs' final states, and deferred acks;
- consumer: the worker's consumer (message size limit, safe acks and close);
- buffer: RECEIVED/STARTED writes batched per process;
- guard: the cancelled-runs copy and the duplicate-delivery claims (jobs.markers);
- signals: the Celery signal handlers, connected in JobsConfig.ready().
"""
