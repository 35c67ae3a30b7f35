"""Smoke test of the scaling study, so that it cannot rot: examples/netsim/run_scaling.sh on a
2-host simulated cluster at 100 Mbit/s with one tensor of 2M elements (bench_comm.py, then
scaling_report.py's fit, table, targets and plot), and the teardown. Needs root (network
namespaces); CI runs as root.

Why 2M elements and not bench_comm's "tiny" set (0.6M): Horovod's control messages flow all
the time (tens of kB/s per rank, more under load); with ~0.1 MB of sign bits per step they are
several % of the bytes, and subtracting their idle rate is only an estimate. At 2M elements
they stay near 1%, so the 5% bound tests the exchange, not the estimate."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from netsimcommon import ROOT, namespaces, needs_netsim

RUN_SCALING = ROOT / "examples" / "netsim" / "run_scaling.sh"
D = 2_097_152          # gradient elements (one tensor, one bucket)
sys.path.insert(0, str(ROOT / "examples" / "netsim"))

from scaling_report import EXCHANGES, sharded_down_planes  # noqa: E402

pytestmark = needs_netsim("mpirun")


def test_scaling_smoke(tmp_path, netsim_prefix):
    prefix = netsim_prefix
    out = tmp_path / "out"
    env = {**os.environ, "HSG_NETSIM_PREFIX": prefix, "HSG_NETSIM_STATE": str(tmp_path / "net"),
           "HOSTS": "2", "RATE": "100mbit", "MODEL": f"d={D}", "OUT": str(out),
           "PYTHON": sys.executable, "TIMEOUT_S": "100",
           "BENCH_ARGS": "--steps 2 --min-steps 2 --budget-s 2 --rounds 1 --warmup 1 "
                         "--profile none"}
    proc = subprocess.run([str(RUN_SCALING)], env=env, capture_output=True, text=True,
                          timeout=170, stdin=subprocess.DEVNULL)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert namespaces(prefix) == [], "the cluster was not torn down"

    fit = json.loads((out / "fit.json").read_text())
    points = {p["exchange"]: p for p in fit["points"] if p["ranks"] == 2}
    assert {"hvd_fp32", "hvd_fp16", "allgather", "alltoall"} <= set(points), log
    assert set(fit["fits"]) >= {"hvd_fp32", "hvd_fp16", "allgather", "alltoall"}
    for p in points.values():
        assert p["hosts"] == 2 and p["time"] > 0 and p["steps"] >= 2, p

    # the interface bytes of the sharded vote: at n = 2 half of the votes tie, so the owners'
    # results carry a tie plane: (n-1)/n * d/8 up + 2 (n-1)/n * d/8 down, plus the 16-byte
    # headers of the pieces and results, within 5% (TCP/IP framing: well under 1% on veth)
    a2a, n, d = points["alltoall"], 2, points["alltoall"]["d"]
    assert d == D
    assert sharded_down_planes(n) == 2.0
    want = (n - 1) / n * d / 8 * 3 + 16 * 2 * (n - 1)
    assert abs(a2a["iface_tx_net"] / want - 1) <= 0.05, (a2a, want)
    # the formula without the ties is then 1.5x below, which the report must say
    bytes_target = fit["targets"][0]
    assert bytes_target["met"] is False, bytes_target
    ratio = float(bytes_target["measured"].split("n=2: ")[1].split()[0])
    assert 1.4 < ratio < 1.6, bytes_target
    # the allgather vote and Horovod's ring: their own formulas, within 5% as well
    ag = points["allgather"]
    assert abs(ag["iface_tx_net"] / ((n - 1) * d / 8) - 1) <= 0.05, ag
    f32 = points["hvd_fp32"]
    assert abs(f32["iface_tx_net"] / EXCHANGES["hvd_fp32"]["bytes"](n, d, 1) - 1) <= 0.05, f32

    md = (out / "SCALING.md").read_text()
    for title in ("Horovod fp32 (ring allreduce)", "signsgd, allgather vote",
                  "signsgd, compressed allreduce (alltoall)"):
        assert f"| {title} | 2 |" in md, md
        assert f"| {title}, as fitted | " in md.split("Extrapolated step times")[1], md
    assert (out / "scaling.png").stat().st_size > 5000
    # the hierarchical exchange runs with 2 ranks per host where DistributedOptimizer has it,
    # and is skipped with the reason where it does not
    if "hierarchical" in points or any(p["exchange"] == "hierarchical" for p in fit["points"]):
        hier = next(p for p in fit["points"] if p["exchange"] == "hierarchical")
        assert hier["ranks"] == 4 and hier["hosts"] == 2, hier
    else:
        assert any("hierarchical" in note and "rejects" in note for note in fit["notes"]), fit
        assert "hierarchical" in md.split("Not measured:")[1]
