from django.core.management.base import BaseCommand

from jobs.roles import ROLES, setup_roles


class Command(BaseCommand):
    help = "Create the viewer, submitter, operator and admin groups (also runs after migrate)."

    def handle(self, *args, **options) -> None:
        setup_roles()
        self.stdout.write(f"Roles ready: {', '.join(ROLES)}.")
