from django.core.management.base import BaseCommand

from jobs import services, specs


class Command(BaseCommand):
    help = "Create JobType rows for job types declared in code (also runs after migrate)."

    def handle(self, *args, **options) -> None:
        created = services.jobtypes_sync()
        self.stdout.write(f"{created} job type(s) created, {len(specs.all_specs())} declared.")
