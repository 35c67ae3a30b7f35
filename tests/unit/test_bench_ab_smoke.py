"""examples/bench_ab.py loads two builds side by side and times every shared kernel (a smoke
test: the checkout's build against a copy of itself, one repeat; the ratios are not judged,
but two identical builds must give identical outputs, and a copy must load as a module of
its own)."""
import importlib.machinery
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_build_against_a_copy_of_itself(tmp_path):
    build = next(ROOT / "hvd_signsgd" / f"_native{suffix}"
                 for suffix in importlib.machinery.EXTENSION_SUFFIXES
                 if (ROOT / "hvd_signsgd" / f"_native{suffix}").exists())
    copy = tmp_path / build.name
    shutil.copy(build, copy)
    out = subprocess.run([sys.executable, "examples/bench_ab.py", "--baseline", str(copy),
                          "--repeat", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=True).stdout
    rows = [line for line in out.splitlines() if line.rstrip().endswith("x")]
    names = [line.split("  ")[0] for line in rows]
    for kernel in ("sign_scan", "momentum_sign", "momentum_absmax", "pack_stochastic_signs",
                   "ef_sign", "ef_signsgd encode", "vote majority", "vote mean", "scaled_vote",
                   "add_finite", "sparse_sum", "topk_take"):
        assert any(n.startswith(kernel) for n in names), (kernel, out)
    assert "DIFFER" not in out, out
