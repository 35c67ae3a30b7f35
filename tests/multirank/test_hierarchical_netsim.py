"""The hierarchical exchange on a simulated cluster of 2 hosts with 2 ranks each (netsim.sh,
network namespaces): the bytes that really leave each host (its link's tx counter) are what
the model of examples/netsim/hier_bytes.py predicts, for exchange="allgather" and
exchange="hierarchical", and fall by about (n - 1) / (H - 1) = 3. Hosts are Horovod's own
(the ranks' hostnames differ): no HVD_SIGNSGD_LOCAL_SIZE. Needs root; CI runs as root."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from netsimcommon import NETSIM, ROOT, namespaces, needs_netsim

SCRIPT = ROOT / "examples" / "netsim" / "hier_bytes.py"

pytestmark = needs_netsim("mpirun")


def test_host_link_bytes_match_the_model(tmp_path, netsim_prefix):
    prefix = netsim_prefix
    out = tmp_path / "r.json"
    env = {**os.environ, "HSG_NETSIM_PREFIX": prefix, "HSG_NETSIM_STATE": str(tmp_path / "n"),
           "HSG_NETSIM_SLOTS": "2", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.setdefault("HSG_NETSIM_SUBNET", "10.213.41")
    cmd = (f'"$HSG_NETSIM" mpirun -n 4 -x HOROVOD_DYNAMIC_PROCESS_SETS=1 -x PYTHONPATH '
           f'-x OMP_NUM_THREADS {sys.executable} {SCRIPT} --dim 1536 --steps 4 --out {out}')
    try:
        proc = subprocess.run([str(NETSIM), "with", "2", "sh", "-c", cmd], env=env,
                              capture_output=True, text=True, timeout=240,
                              stdin=subprocess.DEVNULL)
    finally:
        if namespaces(prefix):
            subprocess.run([str(NETSIM), "down"], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert namespaces(prefix) == []
    r = json.loads(out.read_text())
    assert r["ranks"] == 4 and r["local_size"] == 2, r     # Horovod sees 2 hosts of 2
    runs = {x["exchange"]: x for x in r["runs"]}
    print("hier_bytes:", json.dumps(r))      # the numbers, for -s
    measured, model = {}, {}
    for name, x in runs.items():
        assert x["identical"], f"{name}: parameters differ between ranks"
        assert len(x["host_tx"]) == 2
        for tx, per_step, idle in zip(x["host_tx"], x["model_per_step"], r["idle_tx_per_s"]):
            # TCP/IP headers and ACKs add a few % to ~300 kB payloads; Horovod's coordination
            # flows all the time, at the rate measured idle (60-530 kB/s a host, by load)
            payload = per_step * x["steps"]
            assert 0.99 * payload <= tx <= 1.06 * payload + idle * x["window_s"], (name, r)
        measured[name], model[name] = sum(x["host_tx"]), sum(x["model_per_step"])
    assert model["allgather"] / model["hierarchical"] == pytest.approx(3.0, rel=0.01)
    print("measured allgather / hierarchical:", measured["allgather"] / measured["hierarchical"])
