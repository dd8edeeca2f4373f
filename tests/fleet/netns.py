"""A fleet of hosts on one machine: network namespaces joined by a bridge.

Each host is a network namespace of its own (``jsf-<tag>-<name>``) with a loopback and
one veth (``eth0``) whose other end is plugged into a bridge (``br0``) that lives in a
namespace of its own (``jsf-<tag>-br``): the machine's main namespace gets no address,
route or interface of the fleet. Addresses come only from 10.231.1.0/24.

Processes run with ``ip netns exec`` in their own session; ``Fleet.close`` kills every
process left in the fleet's namespaces (``ip netns pids``) and deletes the namespaces.
``sweep`` does the same for stale ``jsf-*`` namespaces a crashed run left behind.
A host is cut off by taking its veth's bridge end down (``cut``), silently, as a pulled
cable: neither end sees a reset, only heartbeats and timeouts notice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "jsf-"
SUBNET = "10.231.1"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def namespaces() -> list[str]:
    listed = ip("-o", "netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in listed if line.strip()]


def kill_namespace(name: str) -> None:
    """SIGKILL every process in namespace ``name`` (all started by a fleet), then delete it."""
    for _ in range(20):
        pids = [int(p) for p in ip("netns", "pids", name, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    ip("netns", "del", name, check=False)


def sweep() -> list[str]:
    """Remove the fleet namespaces (``jsf-*``) an earlier run left behind."""
    stale = [name for name in namespaces() if name.startswith(PREFIX)]
    for name in stale:
        kill_namespace(name)
    return stale


@dataclass
class Process:
    """A process started in a host's namespace, in a session of its own."""

    argv: list[str]
    log: Path
    popen: subprocess.Popen

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, chars: int = 5000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output(200_000):
                return
            if not self.alive():
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.argv[:6]} never logged {text!r}:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)


@dataclass
class Host:
    fleet: Fleet
    name: str
    address: str
    netns: str
    veth: str  # the bridge's end, in the bridge namespace
    dir: Path
    processes: list[Process] = field(default_factory=list)

    def run(
        self, argv: list[str], env: dict | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv], env=env, check=check,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def start(self, argv: list[str], env: dict | None = None, label: str = "") -> Process:
        log = self.dir / f"{label or Path(argv[0]).name}-{len(self.processes)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv], env=env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.fleet.cwd,
            )  # fmt: skip
        process = Process(argv, log, popen)
        self.processes.append(process)
        return process

    def cut(self) -> None:
        """Pull the cable: the bridge's end of this host's veth goes down."""
        ip("-n", self.fleet.bridge, "link", "set", self.veth, "down")

    def heal(self) -> None:
        ip("-n", self.fleet.bridge, "link", "set", self.veth, "up")


class Fleet:
    """Hosts in namespaces on one bridge; ``close`` undoes all of it."""

    def __init__(self, cwd: str | Path = ".", tag: str = "") -> None:
        self.tag = tag or uuid.uuid4().hex[:5]
        self.cwd = str(cwd)
        self.dir = Path(tempfile.mkdtemp(prefix=f"jobsite-fleet-{self.tag}-"))
        self.bridge = f"{PREFIX}{self.tag}-br"
        self.hosts: dict[str, Host] = {}
        self.made: list[str] = []
        ip("netns", "add", self.bridge)
        self.made.append(self.bridge)
        ip("-n", self.bridge, "link", "set", "lo", "up")
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")

    def add(self, name: str, octet: int) -> Host:
        assert 1 < octet < 255 and name not in self.hosts
        netns = f"{PREFIX}{self.tag}-{name}"
        ip("netns", "add", netns)
        self.made.append(netns)
        veth = f"v{octet}"
        ip("-n", self.bridge, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
           "netns", netns)  # fmt: skip
        ip("-n", self.bridge, "link", "set", veth, "master", "br0", "up")
        address = f"{SUBNET}.{octet}"
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        host_dir = self.dir / name
        host_dir.mkdir()
        host = Host(self, name, address, netns, veth, host_dir)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            for process in host.processes:
                with contextlib.suppress(Exception):
                    process.stop(timeout=5)
        for name in reversed(self.made):
            kill_namespace(name)
        self.made.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
