"""Smoke test of the DDP benchmark against PowerSGD, so that it cannot rot: a 2-host simulated
cluster (network namespaces, 1 Gbit/s links), one torchrun per host (`netsim.sh torchrun`),
examples/netsim/ddp_bench.py with tiny shapes and 2 steps, its report, and the teardown.
Needs root (network namespaces); CI runs as root."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from netsimcommon import ROOT, namespaces, needs_netsim

RUN = ROOT / "examples" / "netsim" / "run_ddp_bench.sh"
CONFIGS = ["fp32", "fp16", "powersgd-r1", "powersgd-r2", "powersgd-r4", "signsgd", "signum",
           "ef_signsgd", "topk-1%", "signsgd-a2a"]

pytestmark = needs_netsim()


def test_ddp_bench_smoke(tmp_path, netsim_prefix):
    prefix = netsim_prefix
    out = tmp_path / "out"
    env = {**os.environ, "HSG_NETSIM_PREFIX": prefix, "HSG_NETSIM_STATE": str(tmp_path / "net"),
           "HOSTS": "2", "RATE": "1gbit", "SHAPES": "tiny", "OUT": str(out),
           "PYTHON": sys.executable, "TIMEOUT_S": "240",
           "BENCH_ARGS": "--steps 2 --warmup 2 --e2e-width 64 --digits-epochs 2"}
    proc = subprocess.run([str(RUN)], env=env, capture_output=True, text=True, timeout=330,
                          stdin=subprocess.DEVNULL)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert namespaces(prefix) == [], "the cluster was not torn down"

    raw = json.loads((out / "raw.json").read_text())
    assert raw["meta"]["distinct_hosts"] == 2, raw["meta"]["host_names"]   # two "hosts"
    table = (out / "RESULTS.md").read_text()
    for part in ("shapes", "e2e", "digits"):
        assert list(raw[part]) == CONFIGS, part
        for name in CONFIGS:
            assert f"| {name} |" in table
            r = raw[part][name]
            # bytes from the interface counters of both hosts, every configuration
            assert r["iface_all"] is not None and len(r["iface_all"]) == 2, (part, name)
            assert all(tx > 0 and rx > 0 for tx, rx in r["iface_all"]), (part, name)
    # the counters see what each hook sends: fp16 half of fp32, 1-bit signs far less
    shapes = raw["shapes"]
    tx = {k: sum(x[0] for x in v["iface_all"]) for k, v in shapes.items()}
    assert 0.4 < tx["fp16"] / tx["fp32"] < 0.6, tx
    assert tx["signsgd"] * 15 < tx["fp32"] and tx["powersgd-r1"] * 15 < tx["fp32"], tx
    assert shapes["signsgd-a2a"]["exchange"] == ["alltoall"]
    assert shapes["signsgd"]["exchange"] == ["allgather"]
    assert raw["digits"]["fp32"]["time_to_target"] is not None
    assert "## Verdict" in table and "netsim.sh counters" in table
