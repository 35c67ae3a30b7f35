"""examples/bench_kernels.py --only fused runs and reports every fused encode against its
memory-traffic bound (a smoke test: small n, one repeat; the ratios are not judged here)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fused_section_reports_every_kernel():
    out = subprocess.run([sys.executable, "examples/bench_kernels.py", "--log2n", "14",
                          "--repeat", "1", "--only", "fused"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, check=True).stdout
    for kernel in ("ef_sign", "ecx_sign", "momentum_sign", "momentum_absmax", "sign_scan",
                   "add_finite"):
        line = next((x for x in out.splitlines() if f"| native {kernel} kernel" in x), None)
        assert line is not None and "of bound" in line, (kernel, out)
    line = next((x for x in out.splitlines() if "| native ef_sign_deferred" in x), None)
    assert line is not None and "of bound" in line and "ef_sign's speed" in line, out
    line = next((x for x in out.splitlines() if "| native topk_take_sum" in x), None)
    assert line is not None and "of bound" in line, out
