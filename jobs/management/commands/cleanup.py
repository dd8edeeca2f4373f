from django.core.management.base import BaseCommand

from jobs.services import jobs_cleanup


class Command(BaseCommand):
    help = "Delete runs, logs and Celery results past their retention, in batches."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--batch", type=int, default=5000)

    def handle(self, *args, batch: int, **options) -> None:
        deleted = jobs_cleanup(batch=batch)
        self.stdout.write(f"Deleted {deleted['runs']} run(s), {deleted['task_results']} result(s).")
