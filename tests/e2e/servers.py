"""Private, restartable instances of the real servers, for fault tests.

A test that restarts a broker or a database must not restart the machine's shared one
(other tests, and other users of the machine, talk to it). These start Debian's own
``redis-server``, ``rabbitmq-server`` and PostgreSQL binaries on a free port with a data
directory of their own, and stop them the way an operator would (SIGTERM: a clean
shutdown that keeps what is durable) or kill them (SIGKILL).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(
    port: int,
    timeout: float,
    process: subprocess.Popen | None = None,
    address: str = "127.0.0.1",
    what: str = "server",
) -> None:
    """Return once ``address:port`` accepts a connection; fail if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((address, port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {address}:{port} within {timeout:.0f} s")


def netns_wait_for_port(netns: str, address: str, port: int, timeout: float, what: str) -> None:
    """``wait_for_port`` from inside the network namespace ``netns``."""
    probe = (
        "import socket, sys, time\n"
        f"deadline = time.monotonic() + {timeout}\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        f"        socket.create_connection(({address!r}, {port}), 0.5).close(); sys.exit(0)\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
        "sys.exit(1)\n"
    )
    done = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c", probe], check=False)
    if done.returncode:
        raise RuntimeError(f"{what} did not listen on {address}:{port} in {netns}")


class PrivateServer:
    """A server process in its own session, with a data directory of its own.

    ``address`` is the one address it binds; ``netns``, when given, is the network
    namespace it runs in (``ip netns exec``), for the fleet harness (tests/fleet/).
    """

    what = "server"

    def __init__(self, prefix: str, address: str = "127.0.0.1", netns: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"jobsite-{prefix}-"))
        self.address = address
        self.netns = netns
        # In a namespace of its own every port is free; the main namespace's are asked.
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def in_netns(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def wait_listening(self, timeout: float) -> None:
        if self.netns:
            netns_wait_for_port(self.netns, self.address, self.port, timeout, self.what)
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.what} exited with {self.process.returncode}")
        else:
            wait_for_port(self.port, timeout, self.process, self.address, what=self.what)

    def available(self) -> bool:
        """Whether this machine has the server's binary."""
        return shutil.which(self.argv()[0]) is not None

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout: float = 60) -> None:
        log = (self.dir / "server.log").open("ab")
        self.process = subprocess.Popen(
            self.in_netns(self.argv()), env=self.environment(), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.wait_listening(timeout)
        self.ready(timeout)

    def ready(self, timeout: float) -> None:
        """Wait until the server serves, not only listens (default: listening is enough)."""

    def stop(self, timeout: float = 60) -> None:
        """A clean shutdown (SIGTERM to the server's process group)."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._signal(signal.SIGKILL, 10)

    def _signal(self, sig: int, timeout: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(
                (self.dir / "server.log").read_text(errors="replace").splitlines()[-lines:]
            )
        return ""

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis(PrivateServer):
    """redis-server, append-only with fsync always, as a broker that must not lose must be."""

    what = "redis-server"

    def __init__(self, address: str = "127.0.0.1", netns: str | None = None) -> None:
        super().__init__("redis", address, netns)
        self.url = f"redis://{address}:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            "redis-server", "--port", str(self.port), "--bind", self.address,
            "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "",
            # Off loopback (the fleet's subnet), no password: a test's private server only.
            "--protected-mode", "no" if self.address != "127.0.0.1" else "yes",
        ]  # fmt: skip


class PrivateRabbitMQ(PrivateServer):
    """A RabbitMQ node of its own (node name, ports, Mnesia directory, Erlang cookie)."""

    what = "rabbitmq-server"
    binary = "/usr/lib/rabbitmq/bin/rabbitmq-server"

    def __init__(self, address: str = "127.0.0.1", netns: str | None = None) -> None:
        super().__init__("rabbitmq", address, netns)
        self.dist_port = free_port()
        self.node = f"jobsite-{self.port}@localhost"
        self.url = f"amqp://guest:guest@{address}:{self.port}//"
        if address != "127.0.0.1":
            # guest may log in from elsewhere than loopback only if told so.
            (self.dir / "rabbitmq.conf").write_text("loopback_users = none\n")
        (self.dir / "home").mkdir()
        (self.dir / "enabled_plugins").write_text("[].\n")

    def available(self) -> bool:
        return os.path.exists(self.binary)

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.dir / "home"),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": self.address,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
        }

    def argv(self) -> list[str]:
        return [self.binary]

    def ready(self, timeout: float) -> None:
        # The AMQP port opens before the node serves every vhost: wait for a real login.
        import kombu

        if self.netns:
            probe = (
                "import kombu, sys, time\n"
                f"deadline = time.monotonic() + {timeout}\n"
                "while True:\n"
                "    try:\n"
                f"        kombu.Connection({self.url!r}, connect_timeout=2).ensure_connection("
                "max_retries=1); sys.exit(0)\n"
                "    except Exception:\n"
                "        if time.monotonic() > deadline: raise\n"
                "        time.sleep(0.2)\n"
            )
            import sys

            subprocess.run(self.in_netns([sys.executable, "-c", probe]), check=True)
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                with kombu.Connection(self.url, connect_timeout=2) as conn:
                    conn.ensure_connection(max_retries=1)
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


class PrivatePostgres(PrivateServer):
    """A PostgreSQL cluster of its own (initdb into a temporary directory, trust auth)."""

    what = "postgres"

    def __init__(self, address: str = "127.0.0.1", netns: str | None = None) -> None:
        super().__init__("postgres", address, netns)
        self.data = self.dir / "data"
        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        self.bin = Path(bindirs[-1]) if bindirs else Path("/nonexistent")
        self.url = f"postgres://postgres@{address}:{self.port}/jobsite"
        self._initialised = False

    def available(self) -> bool:
        return (self.bin / "initdb").exists()

    def _as_postgres(self, argv: list[str]) -> list[str]:
        # PostgreSQL refuses to run as root; Debian's `postgres` user runs it.
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def argv(self) -> list[str]:
        return self._as_postgres([
            str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", f"listen_addresses={self.address}", "-c", f"unix_socket_directories={self.dir}",
            "-c", "fsync=on", "-c", "max_connections=200",
        ])  # fmt: skip

    def start(self, timeout: float = 60) -> None:
        if not self._initialised:
            if os.geteuid() == 0:
                shutil.chown(self.dir, "postgres")
            subprocess.run(
                self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-U",
                                   "postgres", "--auth=trust", "-E", "UTF8"]),
                check=True, capture_output=True,
            )  # fmt: skip
            self._initialised = True
            if self.address != "127.0.0.1":
                # initdb trusts loopback only; the fleet's hosts connect over their subnet.
                with (self.data / "pg_hba.conf").open("a") as hba:
                    hba.write(f"host all all {self.address.rsplit('.', 1)[0]}.0/24 trust\n")
            super().start(timeout)
            subprocess.run(
                self.in_netns([str(self.bin / "createdb"), "-h", self.address, "-p", str(self.port),
                 "-U", "postgres", "jobsite"]),
                check=True, capture_output=True,
            )  # fmt: skip
            return
        super().start(timeout)

    def ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                self.in_netns([str(self.bin / "pg_isready"), "-h", self.address, "-p",
                               str(self.port)]),
                capture_output=True,
            )  # fmt: skip
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready: {done.stdout!r}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> None:
        # SIGINT to the postmaster is PostgreSQL's "fast" shutdown: it ends the sessions
        # and checkpoints (to it alone: its children take SIGINT as "cancel").
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            os.kill(int((self.data / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
