from celery import current_app
from django.core.management.base import BaseCommand

from jobs.events.recorder import Recorder


class Command(BaseCommand):
    help = (
        "Record the task events of every worker started with -E (other codebases' too) "
        "in Jobsite's history. Runs until SIGTERM; on RabbitMQ events wait in a durable "
        "queue while it is stopped."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--batch",
            type=int,
            default=None,
            help="Events per stored batch (JOBSITE_EVENTS_BATCH, 500).",
        )
        parser.add_argument(
            "--flush-ms",
            type=int,
            default=None,
            help="Longest an event waits in a batch (JOBSITE_EVENTS_FLUSH_MS).",
        )

    def handle(self, *args, batch: int | None, flush_ms: int | None, **options) -> None:
        if batch is not None and not 1 <= batch <= 5000:
            self.stderr.write("--batch must be between 1 and 5000.")
            raise SystemExit(2)
        if flush_ms is not None and not 1 <= flush_ms <= 60_000:
            self.stderr.write("--flush-ms must be between 1 and 60000.")
            raise SystemExit(2)
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        Recorder(app, batch=batch, flush_ms=flush_ms).run()
