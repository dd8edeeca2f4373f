from django.core.management.base import BaseCommand

from jobs.services import redis_queues_migrate


class Command(BaseCommand):
    help = (
        "Move messages and bindings a Redis broker holds under Jobsite's old key layout "
        '(`sep: ":"`, 0.3.1 and before) to kombu\'s default one. Atomic per message; '
        "safe to run twice; workers also run it when they start."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="Show what would move; change nothing."
        )

    def handle(self, *args, dry_run: bool, **options) -> None:
        report = redis_queues_migrate(dry_run=dry_run)
        if report.broker != "redis":
            self.stdout.write(f"The broker is {report.broker}: it has no Redis keys to move.")
            return
        verb = "Would move" if dry_run else "Moved"
        for keys, count in report.moved.items():
            self.stdout.write(f"{verb} {count} message(s): {keys}")
        for entry in report.dropped:
            self.stderr.write(f"Unreadable binding {'to drop' if dry_run else 'dropped'}: {entry}")
        for reason in report.skipped:
            self.stderr.write(f"Left alone: {reason}")
        self.stdout.write(
            f"{verb} {report.messages} message(s) and {report.bindings} binding(s) "
            "to kombu's default key layout."
        )
