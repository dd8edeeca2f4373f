"""Create the demo superuser if there is no superuser yet (used by `dev.py run`)."""

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create a superuser from DJANGO_SUPERUSER_* (or a generated password) if none exists."

    def handle(self, *args, **options) -> None:
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME", "admin")
        given = os.environ.get("DJANGO_SUPERUSER_PASSWORD")
        password = given or secrets.token_urlsafe(12)
        email = os.environ.get("DJANGO_SUPERUSER_EMAIL", "admin@example.com")
        User.objects.create_superuser(username=username, email=email, password=password)
        # A password the operator chose is theirs already: printing it would only put it
        # in a terminal's scrollback or a container's log.
        shown = (
            "the password from DJANGO_SUPERUSER_PASSWORD"
            if given
            else (f"password {password!r} (shown once)")
        )
        self.stdout.write(self.style.SUCCESS(f"Created superuser {username!r} with {shown}."))
