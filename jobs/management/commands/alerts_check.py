"""Run the alert check once, now (the periodic task does the same every minute)."""

from django.core.management.base import BaseCommand

from jobs.services.alerts import alerts_check


class Command(BaseCommand):
    help = "Evaluate the alert rules once: failed runs, missed schedules, silent beat/workers."

    def handle(self, *args, **options) -> None:
        result = alerts_check()
        if result.skipped:
            self.stdout.write("Another alert check is running; skipped.")
            return
        self.stdout.write(
            f"{result.failures} new failed run(s); "
            f"{result.raised} alert(s) sent, {result.folded} folded into earlier ones."
        )
