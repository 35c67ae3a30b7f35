"""Smoke test of the time-to-accuracy benchmark (examples/time_to_accuracy.py), so that it
cannot rot: 2 ranks under plain mpirun, a tiny MLP and a budget of a few steps, every
contender (Horovod fp32 / fp16 and every method in hvd_signsgd.METHODS)."""
from __future__ import annotations

import json
import subprocess
import sys

from harness import ROOT, run_job

import hvd_signsgd

SCRIPT = ROOT / "examples" / "time_to_accuracy.py"


def test_time_to_accuracy_smoke(tmp_path):
    out = tmp_path / "out"
    job = run_job(script=SCRIPT, np=2, launcher="mpirun", timeout=300,
                  args=["--hidden", "32", "--steps", "6", "--eval-every", "3",
                        "--out-dir", str(out)])
    assert job.returncode == 0 and not job.timed_out, job.diagnostics()

    contenders = ["hvd_fp32", "hvd_fp16", *hvd_signsgd.METHODS]
    table = (out / "time_to_accuracy.md").read_text()
    for c in contenders:
        assert f"| `{c}` |" in table, (c, table)
    assert "FAILED" not in table, table
    assert (out / "time_to_accuracy.png").stat().st_size > 10_000

    summary = json.loads((out / "time_to_accuracy.json").read_text())
    results = {r["contender"]: r for r in summary["results"]}
    assert list(results) == contenders
    starts = set()
    for name, r in results.items():
        curve = r["curve"]
        # step 0 (before training), then after steps 3 and 6
        assert [p["step"] for p in curve] == [0, 3, 6], (name, curve)
        walls = [p["wall_s"] for p in curve]
        assert walls[0] == 0.0 and all(a < b for a, b in zip(walls, walls[1:])), (name, walls)
        assert abs(walls[-1] - r["wall_s"]) < 1e-9
        assert r["ranks_identical"], name
        starts.add(curve[0]["test_acc"])
        if not r["horovod"]:
            # hvd_signsgd's exact count: a compressed method hands over far less than fp32
            bps = r["bytes_per_step"]
            assert bps["source"] == "compression_stats" and bps["sent"] > 0, (name, bps)
            if name not in ("none", "fp16"):
                assert bps["sent"] < bps["dense_fp32"] / 4, (name, bps)
    # every contender starts from the same initialisation
    assert len(starts) == 1, starts
    # the target is fp32's final accuracy (mean of its last 3 evaluations) minus 1 point
    fp32 = [p["test_acc"] for p in results["hvd_fp32"]["curve"]]
    assert abs(summary["target_acc"] - (sum(fp32) / 3 - 0.01)) < 1e-12
    # time to target: the first evaluation at or above it; speed-ups are ratios of those
    target = summary["target_acc"]
    for name, r in results.items():
        hit = next(((p["wall_s"], p["step"]) for p in r["curve"] if p["test_acc"] >= target),
                   (None, None))
        assert (r["time_to_target_s"], r["steps_to_target"]) == hit, name
        for base in ("hvd_fp32", "hvd_fp16"):
            b, t = results[base]["time_to_target_s"], r["time_to_target_s"]
            want = b / t if b and t else None
            assert r[f"speedup_vs_{base}"] == want, (name, base)
        est = r["steps_to_target"] * r["step_s_median"] if r["steps_to_target"] else None
        assert r["time_to_target_est_s"] == est, name

    # the table and plot can be redrawn from the JSON alone, to the same table
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--from-json",
                           str(out / "time_to_accuracy.json"), "--out-dir", str(again)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (again / "time_to_accuracy.md").read_text() == table
