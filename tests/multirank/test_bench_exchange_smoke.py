"""Smoke test of examples/bench_exchange.py, so that it cannot rot: 3 local ranks, the tiny
shapes and one single tensor, both methods; the printed ratios and the JSON rows."""
import json
import subprocess
import sys

from harness import ROOT, job_env, launch_command


def test_bench_exchange_smoke(tmp_path):
    out = tmp_path / "rows.json"
    cmd = launch_command("mpirun", 3, [sys.executable, str(ROOT / "examples" / "bench_exchange.py"),
                                       "--models", "tiny,d=100003", "--methods", "signsgd,ssdm",
                                       "--steps", "2", "--fit", "--out", str(out)])
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recv MB ag/a2a" in proc.stdout and "BETA_s_per_byte" in proc.stdout
    rows = json.loads(out.read_text())
    assert {(r["model"], r["method"]) for r in rows} == {
        ("tiny", "signsgd"), ("tiny", "ssdm"), ("d=100003", "signsgd"), ("d=100003", "ssdm")}
    for r in rows:
        assert r["ranks"] == 3
        # 3 ranks: alltoall receives about 2/3 of a payload per rank each way for the vote
        # (odd n, no ties) against 2 payloads for allgather; the mean sends 2 count planes back
        want = 2 / 3 if r["method"] == "signsgd" else 1.0
        assert abs(r["received_ratio"] - want) < 0.05, r
        assert r["allgather"]["seconds"] > 0 and r["alltoall"]["seconds"] > 0
