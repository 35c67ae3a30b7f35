"""What the tests on the simulated cluster (examples/netsim/netsim.sh) share: the skip rule
(root and the tools netsim.sh needs), a namespace prefix of this test process, and a teardown
that runs even when the script under test could not clean up."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NETSIM = ROOT / "examples" / "netsim" / "netsim.sh"


def needs_netsim(*tools: str):
    """Skip marker: root, iproute2 (ip, tc), util-linux (unshare) and `tools` (e.g. mpirun)."""
    want = ("ip", "tc", "unshare", *tools)
    return pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in want),
                              reason="needs root and " + ", ".join(want))


def namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix + "-")]


@pytest.fixture
def netsim_prefix():
    """A namespace prefix of this test process (parallel runs never collide); afterwards
    `netsim.sh down` if any of its namespaces is left (the scripts clean up themselves: this
    is the safety net)."""
    p = f"hsgt{os.getpid() % 10**6}"
    yield p
    if namespaces(p):
        subprocess.run([str(NETSIM), "down"], env={**os.environ, "HSG_NETSIM_PREFIX": p},
                       capture_output=True, timeout=60)
