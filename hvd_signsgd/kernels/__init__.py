"""Bit-packing and voting kernels: native C with a bit-identical torch fallback.

API (both backends give bit-identical bytes and values for every input; where a result is
NaN, only its NaN-ness is specified, not its sign or payload):

    backend() -> str                      "native" or "torch". The native kernels serve CPU
                                          tensors when the extension imports and
                                          HVD_SIGNSGD_KERNELS != "torch" (read at import);
                                          GPU tensors always use the torch kernels.
    pack_signs(x) -> uint8 tensor         ceil(n/8) bytes, n = x.numel(); bit set = IEEE sign bit
                                          set; element 8j+i -> bit i of byte j (LSB first);
                                          padding bits 0. x: float32/float16/bfloat16, any shape
                                          and strides (logical row-major order), any device.
                                          Zero rule: +0 -> bit 0 (+1), -0 -> bit 1 (-1);
                                          NaN -> its sign bit; +-inf -> its sign.
    pack_stochastic_signs(x, norm, seed, offset=0) -> uint8 tensor
                                          bit 0 (+1) with probability 1/2 + x_i/(2*norm), clamped
                                          to [0, 1] (|x_i| > norm saturates); NaN x_i -> bit 1.
                                          Counter-based RNG: element i depends only on
                                          (seed, offset + i, x_i, norm), so splitting a vector
                                          into calls with matching offsets gives the same bits.
                                          norm: float or 0-dim tensor, >= 0 (ValueError if < 0 or
                                          NaN); norm == 0 (an all-zero gradient) gives fair coins,
                                          the unbiased estimate of 0/0 := 0. A GPU tensor norm is
                                          not checked (no host sync). seed: int, taken mod 2^64.
                                          offset: int, 0 <= offset and offset + n <= 2^63.
                                          Exact rule (see _torch.py): positive iff
                                          float32(u) < 2^23 + x_i * c in float32 arithmetic,
                                          c = float32(min(2^23 / norm, FLT_MAX)), u the 24-bit
                                          hash of (seed, offset + i).
    unpack_signs(bits, n, scale=1.0, out=None, dtype=torch.float32) -> tensor of n values
                                          -scale where bit i is set, else +scale. scale (float or
                                          0-dim tensor) is rounded to float32, then to the output
                                          dtype (RNE); -scale is an exact sign flip. bits: uint8,
                                          >= ceil(n/8) elements (flattened); bits past n ignored.
                                          out: float32/float16/bfloat16, contiguous, same device
                                          as bits, numel >= n; its first n elements (flat order)
                                          are written, and dtype is ignored. Returns out itself if
                                          out.numel() == n, else out.view(-1)[:n]; without out, a
                                          new 1-D tensor of dtype.
    vote(bits2d, n, mode="majority", weights=None, out=None) -> float32 tensor of n values
                                          bits2d: uint8 (n_ranks, >= ceil(n/8)), 1 <= n_ranks <=
                                          2^24, e.g. a view [:, hdr:hdr + nbytes] of an
                                          allgathered buffer of n_ranks payloads; rows may have
                                          any row stride (unit stride inside a row is fastest:
                                          other layouts are copied). s_m = +1 for bit 0, -1 for 1.
                                          mode "sum": sum_m w_m * s_m; mode "majority": the sign
                                          of that sum, ties (sum == 0) give 0 (NaN sums too).
                                          weights None: the sum is the exact integer
                                          n_ranks - 2 * (#set bits). weights (a sequence of floats
                                          or a tensor of n_ranks values, converted to float32):
                                          float32 additions ((0.0 + s_0 w_0) + s_1 w_1) + ... in
                                          rank order (the native kernel keeps that order while
                                          vectorizing across elements). Unweighted votes count
                                          bits (bit-sliced counters), never unpacking n_ranks
                                          float vectors.
                                          out: as for unpack_signs, but float32.
    count_zeros(x) -> int                 number of elements of x equal to +0 or -0 (one pass,
                                          no temporary in the native kernel). x: as pack_signs.
    pack_bits(mask) -> uint8 tensor       a bool tensor packed like pack_signs (bit set = True).
    unpack_bits(bits, n) -> bool tensor   the first n bits of bits (inverse of pack_bits).

Everything returned lives on the input's device. Errors: TypeError for wrong dtypes/types,
ValueError for wrong sizes, layouts, devices or values.

Environment: HVD_SIGNSGD_KERNELS=torch forces the torch kernels; HVD_SIGNSGD_NATIVE_ISA=
auto|portable|avx2 picks the native SIMD path (auto: AVX2 when the CPU has it);
HVD_SIGNSGD_NATIVE_PATH=/path/to/_native*.so loads another build (e.g. sanitized) instead.
"""
import operator
import os
from collections.abc import Sequence

import numpy as np
import torch

from . import _cpu, _torch
from ._loader import load_native

__all__ = ["all_finite", "backend", "count_zeros", "pack_bits", "pack_signs",
           "pack_stochastic_signs", "unpack_bits", "unpack_signs", "vote"]

_native, _native_unavailable = load_native()
_FORCE_TORCH = os.environ.get("HVD_SIGNSGD_KERNELS", "").strip().lower() == "torch"
_USE_NATIVE = _native is not None and not _FORCE_TORCH
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def backend():
    """"native" when the C kernels serve CPU tensors, else "torch"."""
    return "native" if _USE_NATIVE else "torch"


def _native_for(t):
    return _USE_NATIVE and t.is_cpu


# ---- argument checks shared by both backends -------------------------------------------------


def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(t).__name__}")


def _check_float(x, name):
    _check_tensor(x, name)
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, not {x.dtype}")


def _check_bits(bits, name):
    _check_tensor(bits, name)
    if bits.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, not {bits.dtype}")


def _check_n(n):
    if isinstance(n, bool):
        raise TypeError("n must be an int, not bool")
    n = operator.index(n)  # TypeError for non-integers
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n


def _output(out, n, dtype, device, allowed):
    """The contiguous tensor of n elements to write (out itself when it has n elements, else
    a flat view of its first n) - which is also what the kernels return."""
    if out is None:
        if dtype not in allowed:
            raise TypeError(f"dtype must be one of {allowed}, not {dtype}")
        return torch.empty(n, dtype=dtype, device=device)
    _check_tensor(out, "out")
    if out.dtype not in allowed:
        raise TypeError(f"out must be one of {allowed}, not {out.dtype}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, the input on {device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    size = out.numel()
    if size < n:
        raise ValueError(f"out has {size} elements, need {n}")
    return out if size == n else out.view(-1)[:n]


def _weights(weights, n_ranks, device):
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        w = weights.detach().to(device=device, dtype=torch.float32).reshape(-1)
    elif isinstance(weights, (Sequence, np.ndarray)) and not isinstance(weights, (str, bytes)):
        w = torch.from_numpy(np.asarray(weights, dtype=np.float32).reshape(-1)).to(device)
    else:
        raise TypeError(f"weights must be None, a sequence or a tensor, not {type(weights)}")
    if w.numel() != n_ranks:
        raise ValueError(f"weights has {w.numel()} values, need n_ranks = {n_ranks}")
    return w


# ---- the kernels -----------------------------------------------------------------------------


def pack_signs(x):
    """Sign bits of x (1 = negative) packed LSB first into ceil(x.numel()/8) uint8."""
    _check_float(x, "x")
    if _native_for(x):
        return _cpu.pack_signs(_native, x)
    return _torch.pack_signs(x.detach())


def pack_stochastic_signs(x, norm, seed, offset=0):
    """Stochastic signs: +1 (bit 0) with probability 1/2 + x_i/(2*norm); see the module doc."""
    _check_float(x, "x")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, not {type(offset).__name__}")
    if not 0 <= offset <= (1 << 63) - x.numel():
        raise ValueError("need 0 <= offset and offset + x.numel() <= 2**63")
    if isinstance(norm, torch.Tensor):
        if norm.numel() != 1:
            raise ValueError("norm must be a scalar")
        if norm.device.type == "cpu":
            norm = float(norm)
    else:
        norm = float(norm)
    if isinstance(norm, float) and not norm >= 0:
        raise ValueError(f"norm must be >= 0, got {norm}")
    if _native_for(x):
        return _cpu.pack_stochastic_signs(_native, x, norm, seed, offset)
    return _torch.pack_stochastic_signs(x.detach(), norm, seed, offset)


def unpack_signs(bits, n, scale=1.0, out=None, dtype=torch.float32):
    """n values: -scale where bit i is set, else +scale (see the module doc for out)."""
    _check_bits(bits, "bits")
    n = _check_n(n)
    if bits.numel() < _torch.nbytes(n):
        raise ValueError(f"bits has {bits.numel()} bytes, need ceil(n/8) = {_torch.nbytes(n)}")
    result = _output(out, n, dtype, bits.device, _FLOATS)
    if _native_for(bits):
        _cpu.unpack_signs(_native, bits, n, scale, result)
    else:
        _torch.unpack_signs(bits, n, scale, result.view(-1))
    return result


def vote(bits2d, n, mode="majority", weights=None, out=None):
    """Per element, the (weighted) sum of the ranks' +-1 signs, or its sign ("majority")."""
    _check_bits(bits2d, "bits2d")
    n = _check_n(n)
    if mode not in ("majority", "sum"):
        raise ValueError(f"mode must be 'majority' or 'sum', not {mode!r}")
    if bits2d.dim() != 2 or not 1 <= bits2d.shape[0] <= 1 << 24:
        raise ValueError(f"bits2d must be 2-D with 1 to 2^24 rows, got {tuple(bits2d.shape)}")
    if bits2d.shape[1] < _torch.nbytes(n):
        raise ValueError(f"bits2d rows have {bits2d.shape[1]} bytes, need {_torch.nbytes(n)}")
    w = _weights(weights, bits2d.shape[0], bits2d.device)
    result = _output(out, n, torch.float32, bits2d.device, (torch.float32,))
    if _native_for(bits2d):
        _cpu.vote(_native, bits2d, n, mode == "majority", w, result)
    else:
        _torch.vote(bits2d, n, mode == "majority", w, result.view(-1))
    return result


def count_zeros(x):
    """Number of elements of x that are +0 or -0."""
    _check_float(x, "x")
    if _native_for(x):
        return _cpu.count_zeros(_native, x)
    return _torch.count_zeros(x.detach())


def pack_bits(mask):
    """A bool tensor (any shape, logical order) packed LSB first into ceil(numel/8) uint8,
    padding bits 0. CPU tensors go through numpy's packbits, others through torch ops."""
    _check_tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, not {mask.dtype}")
    flat = mask.reshape(-1)
    if flat.is_cpu:
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _torch.pack_bools(flat)


def unpack_bits(bits, n):
    """The first n bits of the uint8 tensor bits (LSB first) as a bool tensor."""
    _check_bits(bits, "bits")
    n = _check_n(n)
    if bits.numel() < _torch.nbytes(n):
        raise ValueError(f"bits has {bits.numel()} bytes, need ceil(n/8) = {_torch.nbytes(n)}")
    if bits.is_cpu:
        flat = bits.reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = np.unpackbits(flat[:_torch.nbytes(n)].numpy(), count=n, bitorder="little")
        return torch.from_numpy(out).view(torch.bool)
    return _torch.unpack_bools(bits, n)


def all_finite(x):
    """True when no element of x is NaN or Inf. One sum (a single pass, no temporary): a sum of
    finite values is finite unless it overflows, and only then is the exact, element-wise test
    (which allocates a bool per element, ~15x slower) needed."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
