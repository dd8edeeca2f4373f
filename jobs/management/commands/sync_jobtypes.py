from django.core.management.base import BaseCommand

from jobs import catalog


class Command(BaseCommand):
    help = "Create JobType rows for job types declared in code (also runs after migrate)."

    def handle(self, *args, **options) -> None:
        created = catalog.sync()
        self.stdout.write(f"{created} job type(s) created, {len(catalog.all_specs())} declared.")
