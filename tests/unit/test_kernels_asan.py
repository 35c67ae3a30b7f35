"""Builds the extension with AddressSanitizer + UBSan (HVD_SIGNSGD_SANITIZE=1) into a temporary
directory and runs the kernel property tests against it in a subprocess.

The normal build is left alone (other test runs may be using it): the sanitized module is
loaded through HVD_SIGNSGD_NATIVE_PATH, and the subprocess checks that it is really the one in
use before running test_kernels.py, test_native_args.py, test_kernels_fused.py,
test_kernels_momentum.py and test_kernels_sparse.py (every ISA is exercised there).
Also runnable on its own: native/asan_check.sh.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ["tests/unit/test_kernels.py", "tests/unit/test_native_args.py",
         "tests/unit/test_kernels_fused.py", "tests/unit/test_kernels_momentum.py",
         "tests/unit/test_kernels_sparse.py"]
SANITIZER_REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer",
                     "UndefinedBehaviorSanitizer")


def _runtime(name):
    """Path of the compiler's sanitizer runtime, or None."""
    cc = os.environ.get("CC", "gcc")
    if not shutil.which(cc):
        return None
    path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True,
                          check=False).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _build(tmp):
    env = dict(os.environ, HVD_SIGNSGD_SANITIZE="1")
    proc = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp / "lib"),
         "--build-temp", str(tmp / "obj")],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    built = sorted((tmp / "lib" / "hvd_signsgd").glob("_native*"))
    assert len(built) == 1, built
    assert b"__asan_report" in built[0].read_bytes(), "the build is not instrumented"
    return built[0]


CHECK_AND_RUN = textwrap.dedent("""
    import os, sys
    from hvd_signsgd import kernels
    expected = os.environ["HVD_SIGNSGD_NATIVE_PATH"]
    assert kernels.backend() == "native", kernels._native_unavailable
    assert os.path.samefile(kernels._native.__file__, expected), kernels._native.__file__
    print("sanitized module:", kernels._native.__file__, kernels._native.available_isas())
    import pytest
    sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", *sys.argv[1:]]))
""")


def test_kernels_clean_under_asan_and_ubsan(tmp_path):
    asan = _runtime("libasan.so")
    if asan is None:
        pytest.skip("the C compiler has no AddressSanitizer runtime")
    module = _build(tmp_path)
    env = dict(os.environ)
    env.pop("HVD_SIGNSGD_KERNELS", None)
    env.pop("HVD_SIGNSGD_NATIVE_ISA", None)
    env.update(
        HVD_SIGNSGD_NATIVE_PATH=str(module),
        LD_PRELOAD=asan,  # the ASan runtime must come first; libubsan is a dependency
        ASAN_OPTIONS="detect_leaks=0",  # CPython does not free everything at exit, by design
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    proc = subprocess.run([sys.executable, "-c", CHECK_AND_RUN, *TESTS], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False, timeout=600)
    output = proc.stdout + proc.stderr
    assert "sanitized module:" in output, output[-5000:]
    assert proc.returncode == 0, output[-5000:]
    for report in SANITIZER_REPORTS:
        assert report not in output, output[-5000:]
