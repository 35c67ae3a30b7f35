"""Backend selection: HVD_SIGNSGD_KERNELS, HVD_SIGNSGD_NATIVE_ISA, HVD_SIGNSGD_NATIVE_PATH
(read at import, so each case runs in a fresh interpreter)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hvd_signsgd import kernels

ROOT = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent("""
    import torch
    from hvd_signsgd import kernels as K
    native = K._native
    print(K.backend(), native.isa() if native else None,
          native.__file__ if native else None)
    x = torch.randn(1000)
    bits = K.pack_signs(x)
    assert torch.equal(K.unpack_signs(bits, 1000), torch.where(x < 0, -1.0, 1.0))
    assert K.vote(torch.stack([bits] * 3), 1000).tolist() == torch.where(x < 0, -1.0, 1.0).tolist()
""")


def probe(**env_vars):
    env = dict(os.environ)
    for key in ("HVD_SIGNSGD_KERNELS", "HVD_SIGNSGD_NATIVE_ISA", "HVD_SIGNSGD_NATIVE_PATH"):
        env.pop(key, None)
    env.update(env_vars)
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False, timeout=120)


def test_default_is_native():
    proc = probe()
    assert proc.returncode == 0, proc.stderr
    backend, isa, _ = proc.stdout.split()
    assert backend == "native"
    assert isa == kernels._native.available_isas()[-1]


def test_env_forces_torch():
    proc = probe(HVD_SIGNSGD_KERNELS="torch")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "torch"


def test_env_forces_portable_isa():
    proc = probe(HVD_SIGNSGD_NATIVE_ISA="portable")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["native", "portable"]


def test_unknown_isa_fails_loudly():
    proc = probe(HVD_SIGNSGD_NATIVE_ISA="sse9")
    assert proc.returncode != 0
    assert "unknown ISA" in proc.stderr


def test_native_path_override(tmp_path):
    copy = tmp_path / Path(kernels._native.__file__).name
    copy.write_bytes(Path(kernels._native.__file__).read_bytes())
    proc = probe(HVD_SIGNSGD_NATIVE_PATH=str(copy))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[2] == str(copy)


@pytest.mark.parametrize("missing", ["/nonexistent/_native.so"])
def test_bad_native_path_fails_loudly(missing):
    proc = probe(HVD_SIGNSGD_NATIVE_PATH=missing)
    assert proc.returncode != 0
