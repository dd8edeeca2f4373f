"""Fixtures of the fleet harness (tests/fleet/netns.py): on unless JOBSITE_FLEET_TESTS=0.

It needs root and iproute2; where they are missing the tests are skipped, and with
CI=true they fail (service_unavailable).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, service_unavailable
from tests.fleet import netns


def _can_make_namespaces() -> str:
    if os.geteuid() != 0 or not shutil.which("ip"):
        return "the fleet harness needs root and iproute2 (ip netns)"
    probe = f"{netns.PREFIX}probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return "" if made.returncode == 0 else f"ip netns add failed: {made.stderr.strip()}"


@pytest.fixture
def fleet(request):
    """An empty fleet (bridge only); every namespace and process it makes goes at teardown."""
    if os.environ.get("JOBSITE_FLEET_TESTS") == "0":
        pytest.skip("fleet tests left out (JOBSITE_FLEET_TESTS=0)")
    problem = _can_make_namespaces()
    if problem:
        service_unavailable(problem)
    netns.sweep()  # what a crashed earlier run left behind
    made = netns.Fleet(cwd=ROOT)
    request.addfinalizer(made.close)
    return made
