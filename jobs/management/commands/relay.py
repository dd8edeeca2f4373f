from django.core.management.base import BaseCommand

from jobs.services import jobs_relay


class Command(BaseCommand):
    help = "Publish runs stored while the broker was down (oldest first; safe to run twice)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--min-age", type=float, default=10.0, help="Seconds a run must wait.")
        parser.add_argument("--limit", type=int, default=10_000)

    def handle(self, *args, min_age: float, limit: int, **options) -> None:
        sent = jobs_relay(min_age=min_age, limit=limit)
        self.stdout.write(f"Relayed {sent} run(s).")
