"""Bit-packing, voting and sparse (Top-k, threshold) kernels: native C with a bit-identical torch

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
    scaled_vote(bits2d, segments, weights, out, zeros=None) -> out
                                          vote(mode="sum") per (offset, size) segment t with
                                          weights[t] (float32 (S, n_ranks)), one call: the
                                          scaled mean of ef_signsgd / ecx (weights scale / n).
                                          zeros: the ranks' zero planes (uint8 (n_ranks,
                                          >= ceil(end / 8))); a marked element's term is +0.0.
    count_zeros(x) -> int                 number of elements of x equal to +0 or -0 (one pass,
                                          no temporary in the native kernel). x: as pack_signs.
    ef_sign(g, e, e_out, segments) -> (bits, zplane, scales, zeros) or None
                                          fused error-feedback scaled sign over p = g + e
                                          (g, e, e_out: float32, 1-D, contiguous, same numel
                                          n <= 2^31 and device; e_out disjoint from g and e).
                                          segments: (offset, size) pairs (a sequence or int64
                                          tensor (S, 2)), offsets multiples of 8, ascending,
                                          non-overlapping, inside [0, n); other elements are
                                          gaps. Per segment t: scale_t = tree_sum(|p_t|) /
                                          float32(max(size - zeros_t, 1)) (float32 division;
                                          tree_sum: the fixed order of native/sg_fused.h);
                                          e_out = p - copysign(scale_t, p) in segments where
                                          p != +-0, else p (gaps included). bits: sign bits of
                                          p (as pack_signs), zplane: bits of p == +-0, scales:
                                          float32 (S,), zeros: int64 (S + 1,) the +-0 count of
                                          each segment, then of the gaps. None (e_out
                                          unspecified, g and e untouched) when any p or scale
                                          is NaN/Inf.
    ef_sign_deferred(g, p, prev_scales, p_out, segments) -> as ef_sign, or None
                                          ef_sign with the memory kept as the last step's p
                                          and its scales: e = ef_residual(p, prev_scales),
                                          then ef_sign's outputs over g + e, except that p_out
                                          gets g + e itself (its residual is formed by the
                                          next call, or by ef_residual). One pass where
                                          ef_sign needs two; the same payload bits. p,
                                          prev_scales (float32 (S,), >= 0): only read.
    ef_residual(p, scales, segments) -> p p <- p - copysign(scale_t, p) where p != +-0 in
                                          segment t, in place: the memory ef_sign would have
                                          written (torch ops, the kernels' rounding).
    ecx_sign(u, d1, d2, d_out, segments, alpha) -> as ef_sign, or None
                                          fused ErrorCompensatedX scaled sign: ef_sign over
                                          p = u + (a*d1 - b*d2), a = float32(2 - alpha),
                                          b = float32(1 - alpha) (0 < alpha <= 1), each
                                          product, the difference and the sum rounded to
                                          float32 in that order (no FMA); d_out (disjoint from
                                          u, d1, d2) gets the new error p - q. alpha = 1 gives
                                          p = u + (d1 - 0*d2): ef_sign's p but for the sign of
                                          a zero sum. None (d_out unspecified, the inputs
                                          untouched) when any p or scale is NaN/Inf; a NaN/Inf
                                          in any input makes p NaN/Inf.
    ecx_sign_deferred(u, p1, prev1, p2, prev2, p_out, segments, alpha) -> as ecx_sign, or None
                                          ecx_sign with both memories kept as earlier steps'
                                          p and their scales: d1 = ef_residual(p1, prev1),
                                          d2 = ef_residual(p2, prev2), then ecx_sign's
                                          outputs over u + (a*d1 - b*d2), except that p_out
                                          gets that sum itself. One pass; the same payload
                                          bits. prev1, prev2: float32 (S,), >= 0; p1, p2 and
                                          the scales are only read.
    tree_abs_sum(x) -> 0-dim float32      sum |x| in the fused kernels' fixed order (tree_sum).
    momentum_sign(g, m, m_out, beta) -> (bits, zplane, zeros) or None
                                          fused Signum momentum: m_out = (a * m) + (b * g),
                                          a = float32(beta), b = float32(1 - beta) (1 - beta in
                                          double), two rounded float32 products and one
                                          rounded sum, no FMA (native/sg_momentum.h); g, m,
                                          m_out as ef_sign's g, e, e_out, beta a finite float.
                                          bits: sign bits of m_out (as pack_signs), zplane: bits
                                          of m_out == +-0, zeros: their number (int). None
                                          (m_out unspecified, g and m untouched) when any m_out
                                          is NaN/Inf (so any NaN/Inf in g or m).
    sign_scan(x) -> (bits, zplane, zeros) or None
                                          signSGD's encode in one pass over x (float32, 1-D,
                                          contiguous): bits and zplane as momentum_sign's for
                                          m_out = x, zeros their number (int). None when any x
                                          is NaN/Inf.
    momentum_absmax(g, m, m_out, beta) -> (absmax, zeros) or None
                                          fused SSDM momentum: m_out as momentum_sign's,
                                          absmax = max |m_out_i| (float; 0.0 when empty), zeros
                                          the number of +-0 in m_out. None as momentum_sign.
    add_finite(a, b, out) -> bool        out = a + b (rounded float32 sums; a, b, out as
                                          ef_sign's g, e, e_out), written in full; False when
                                          any sum is NaN/Inf. The threshold's fused
                                          compensation p = g + e (one pass, the check in it;
                                          Top-k's is in topk_take_sum).
    pack_bits(mask) -> uint8 tensor       a bool tensor packed like pack_signs (bit set = True).
    unpack_bits(bits, n) -> bool tensor   the first n bits of bits (inverse of pack_bits).

Sparse kernels (Top-k / hard threshold with error feedback, their decode). Magnitude is the bit
pattern with the sign cleared, compared as an integer: |v| for every non-NaN v (+0 == -0,
subnormals in order), +-Inf above every finite value and NaN above Inf (the methods never pass
NaN or Inf; the kernels stay in bounds and follow this order). Ties at a cut go to the lowest
position. "Taking" position g writes g (int32) to idx and v = p[g] to vals, float32 or
float16(clamp(v, -65504, 65504)) rounded to nearest even, and sets p[g] = v - (v as sent):
+0.0 for finite float32 values, the rounding residual for float16.

    topk_take(p, segments, idx, vals) -> None
                                          p: float32, 1-D, contiguous, <= 2^31 elements,
                                          updated in place. segments: (offset, size, k) triples
                                          (a sequence or an int64 tensor (S, 3)) of ascending,
                                          non-overlapping ranges of p, k >= 0. Takes, segment by
                                          segment, the min(k, size) positions of largest
                                          magnitude in ascending order (the set of a stable
                                          descending sort). idx: int32, vals: float32 or float16,
                                          both 1-D contiguous with exactly sum(min(k, size))
                                          elements (e.g. views into a payload body). Linear time
                                          (radix select on the magnitude bits, native/sparse.c).
    topk_take_sum(g, e, p, segments, idx, vals) -> bool
                                          p = g + e as add_finite (g, e, p as its a, b, out),
                                          then topk_take(p, segments, idx, vals); natively
                                          one pass over a large segment (its sum is the
                                          candidate scan). False, with p, idx and vals
                                          unspecified, when any sum is NaN/Inf.
    threshold_count(p, lam) -> int        number of i with |p_i| >= float32(lam) (lam >= 0,
                                          rounded to nearest even; +inf above float32's range;
                                          the comparison `p.abs() >= lam` makes in torch).
    threshold_take(p, lam, idx, vals) -> None
                                          takes every such i, ascending; idx and vals must have
                                          exactly threshold_count(p, lam) elements (ValueError,
                                          p unchanged, otherwise).
    sparse_sum(parts, n, out=None, divisor=1) -> float32 tensor of n values
                                          the sum in part order of parts (idx int32, vals float32
                                          or float16): vals[j] added at idx[j] (indices unique
                                          within a part), or (None, vals): n float32 values added
                                          element-wise. Float32 additions from +0.0, each
                                          coordinate in part order: bit-identical to zeros +
                                          index_add_ / add_ part by part, then div_(divisor)
                                          (a number, positive and finite in float32; native:
                                          a block of out at a time when every part is sparse
                                          and ascending). An index outside [0, n) raises
                                          SparseIndexError (its .part says which) before
                                          anything is written. out: as for vote.

Everything returned lives on the input's device. Errors: TypeError for wrong dtypes/types,
ValueError for wrong sizes, layouts, devices or values.

Environment: HVD_SIGNSGD_KERNELS=torch forces the torch kernels; HVD_SIGNSGD_NATIVE_ISA=
auto|portable|avx2 picks the native SIMD path (auto: AVX2 when the CPU has it);
HVD_SIGNSGD_NATIVE_PATH=/path/to/_native*.so loads another build (e.g. sanitized) instead.
"""
import math
import operator
import os
from collections.abc import Sequence

import numpy as np
import torch

from . import _cpu, _torch
from ._loader import load_native

__all__ = ["SparseIndexError", "add_finite", "all_finite", "backend", "count_zeros",
           "ecx_coefficients", "ecx_sign", "ecx_sign_deferred", "ef_residual", "ef_sign",
           "ef_sign_deferred", "momentum_absmax", "momentum_sign",
           "pack_bits", "pack_signs", "pack_stochastic_signs", "scaled_vote", "sign_scan",
           "sparse_sum", "threshold_count", "threshold_take", "topk_take", "topk_take_sum",
           "tree_abs_sum",
           "unpack_bits", "unpack_signs", "vote"]

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
    """Per element, the (weighted) sum of the ranks' +-1 signs, its sign ("majority"), or
    the unweighted sum divided by the number of rows ("mean": the bits of "sum" then div_)."""
    _check_bits(bits2d, "bits2d")
    n = _check_n(n)
    if mode not in ("majority", "sum", "mean") or (mode == "mean" and weights is not None):
        raise ValueError(f"mode must be 'majority', 'sum' or 'mean' (unweighted), not {mode!r}")
    if bits2d.dim() != 2 or not 1 <= bits2d.shape[0] <= 1 << 24:
        raise ValueError(f"bits2d must be 2-D with 1 to 2^24 rows, got {tuple(bits2d.shape)}")
    if bits2d.shape[1] < _torch.nbytes(n):
        raise ValueError(f"bits2d rows have {bits2d.shape[1]} bytes, need {_torch.nbytes(n)}")
    w = _weights(weights, bits2d.shape[0], bits2d.device)
    result = _output(out, n, torch.float32, bits2d.device, (torch.float32,))
    if _native_for(bits2d):
        _cpu.vote(_native, bits2d, n, mode, w, result)
    else:
        _torch.vote(bits2d, n, mode, w, result.view(-1))
    return result


def scaled_vote(bits2d, segments, weights, out, zeros=None):
    """vote(mode="sum") over each (offset, size) segment with its own weights, in one call:
    out[o:o + s] = sum_m weights[t, m] * s_m (float32 from +0.0, rank order) for segment t,
    the bits of one vote() per segment. segments: (offset, size) pairs (a sequence or an int64
    tensor (S, 2)), offsets multiples of 8, ascending, inside out; weights: float32 (S,
    n_ranks); out: float32, 1-D, contiguous (elements outside the segments are left).
    zeros: None, or uint8 (n_ranks, >= ceil(end / 8)) zero planes on bits2d's device: where
    rank m's plane has bit i set, its term at i is +0.0 (a marked zero that does not vote)."""
    _check_bits(bits2d, "bits2d")
    if bits2d.dim() != 2 or not 1 <= bits2d.shape[0] <= 1 << 24:
        raise ValueError(f"bits2d must be 2-D with 1 to 2^24 rows, got {tuple(bits2d.shape)}")
    if zeros is not None:
        _check_bits(zeros, "zeros")
        if zeros.dim() != 2 or zeros.shape[0] != bits2d.shape[0]:
            raise ValueError(f"zeros must be 2-D with one row per rank of bits2d "
                             f"({bits2d.shape[0]}), got {tuple(zeros.shape)}")
        if zeros.device != bits2d.device:
            raise ValueError(f"zeros is on {zeros.device}, bits2d on {bits2d.device}")
    _check_tensor(out, "out")
    if out.dtype != torch.float32 or out.dim() != 1 or not out.is_contiguous():
        raise ValueError("out must be a 1-D contiguous float32 tensor")
    native = _native_for(bits2d)
    # the extension checks a tensor's pairs itself (cheaper than _segment_pairs)
    segs = _native_segments(segments, out.numel()) if native else \
        _segment_pairs(segments, out.numel())
    w = torch.as_tensor(weights, dtype=torch.float32, device=bits2d.device)
    if w.shape != (segs.shape[0], bits2d.shape[0]):
        raise ValueError(f"weights must be (segments, n_ranks) = "
                         f"{(segs.shape[0], bits2d.shape[0])}, got {tuple(w.shape)}")
    if native:
        _cpu.scaled_vote(_native, bits2d, segs, w, out, zeros)
    else:
        end = int(segs[-1].sum()) if segs.numel() else 0
        for rows, name in ((bits2d, "bits2d"), (zeros, "zeros")):
            if rows is not None and rows.shape[1] < _torch.nbytes(end):
                raise ValueError(f"{name} rows have {rows.shape[1]} bytes, need "
                                 f"{_torch.nbytes(end)}")
        for t, (o, s) in enumerate(segs.tolist()):
            if s:
                b0, b1 = o // 8, (o + s + 7) // 8
                _torch.vote(bits2d[:, b0:b1], s, "sum", w[t], out[o:o + s],
                            zeros=None if zeros is None else zeros[:, b0:b1])
    return out


def count_zeros(x):
    """Number of elements of x that are +0 or -0."""
    _check_float(x, "x")
    if _native_for(x):
        return _cpu.count_zeros(_native, x)
    return _torch.count_zeros(x.detach())


def _segment_pairs(segments, n):
    """(S, 2) int64 CPU tensor of validated (offset, size) pairs for ef_sign."""
    if isinstance(segments, torch.Tensor):
        segs = segments.detach().to("cpu", torch.int64).reshape(-1, 2).contiguous()
    else:
        segs = torch.tensor([[operator.index(v) for v in s] for s in segments],
                            dtype=torch.int64).reshape(-1, 2)
    end = 0
    for t, (o, s) in enumerate(segs.tolist()):
        if o < 0 or s < 0 or o % 8 or o < end or o + s > n:
            raise ValueError(f"segment {t} (offset {o}, size {s}): need offsets that are "
                             f"multiples of 8 and ascending, non-overlapping ranges inside "
                             f"[0, {n})")
        end = o + s
    return segs


def _listed(names, last):
    return ", ".join(names[:-1]) + f" {last} " + names[-1]


def _check_streams(out_name, out, **inputs):
    """The fused kernels' arrays: float32, 1-D, contiguous, on one device, of one length
    (at most 2**31), out disjoint from the inputs. Returns the length."""
    first = next(iter(inputs.values()))
    for name, t in (*inputs.items(), (out_name, out)):
        _check_tensor(t, name)
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, not {t.dtype}")
        if t.dim() != 1 or not t.is_contiguous() or t.device != first.device:
            raise ValueError(f"{name} must be 1-D, contiguous, on {first.device}")
    n = first.numel()
    if any(t.numel() != n for t in (*inputs.values(), out)):
        raise ValueError(f"{_listed([*inputs, out_name], 'and')} must have the same number "
                         f"of elements")
    if n > 1 << 31:
        raise ValueError("more than 2**31 elements")
    # equal lengths: two arrays share memory iff their starts are less than n elements apart
    if n and any(abs(out.data_ptr() - t.data_ptr()) < 4 * n for t in inputs.values()):
        raise ValueError(f"{out_name} must not be {_listed(list(inputs), 'or')} "
                         f"(nor overlap it)")
    return n


def _native_segments(segments, n):
    """The segments as the extension takes them: a tensor as is (the extension checks the
    pairs itself, cheaper than _segment_pairs), anything else checked here."""
    if isinstance(segments, torch.Tensor):
        return segments.detach().to("cpu", torch.int64).reshape(-1, 2).contiguous()
    return _segment_pairs(segments, n)


def ef_sign(g, e, e_out, segments):
    """Fused error-feedback scaled sign over p = g + e (see the module doc)."""
    n = _check_streams("e_out", e_out, g=g, e=e)
    if _native_for(g):
        return _cpu.ef_sign(_native, g, e, e_out, _native_segments(segments, n))
    return _torch.ef_sign(g.detach(), e.detach(), e_out, _segment_pairs(segments, n).tolist())


def ef_sign_deferred(g, p, prev_scales, p_out, segments):
    """ef_sign over g + ef_residual(p, prev_scales) in one pass, p_out <- that sum (see the
    module doc)."""
    n = _check_streams("p_out", p_out, g=g, p=p)
    pairs = _native_segments(segments, n) if _native_for(g) else _segment_pairs(segments, n)
    prev = _check_prev_scales(prev_scales, "prev_scales", pairs.shape[0], g.device)
    if _native_for(g):
        return _cpu.ef_sign_deferred(_native, g, p, prev, p_out, pairs)
    return _torch.ef_sign_deferred(g.detach(), p.detach(), prev, p_out, pairs.tolist())


def ecx_sign_deferred(u, p1, prev1, p2, prev2, p_out, segments, alpha):
    """ecx_sign over u + (a*ef_residual(p1, prev1) - b*ef_residual(p2, prev2)) in one pass,
    p_out <- that sum (see the module doc)."""
    _check_alpha(alpha)
    n = _check_streams("p_out", p_out, u=u, p1=p1, p2=p2)
    pairs = _native_segments(segments, n) if _native_for(u) else _segment_pairs(segments, n)
    s1 = _check_prev_scales(prev1, "prev1", pairs.shape[0], u.device)
    s2 = _check_prev_scales(prev2, "prev2", pairs.shape[0], u.device)
    if _native_for(u):
        return _cpu.ecx_sign_deferred(_native, u, p1, s1, p2, s2, p_out, pairs, alpha)
    return _torch.ecx_sign_deferred(u.detach(), p1.detach(), s1, p2.detach(), s2, p_out,
                                    pairs.tolist(), alpha)


def _check_prev_scales(scales, name, n_segs, device):
    """A deferred memory's scales, checked; returned detached and contiguous."""
    _check_tensor(scales, name)
    if (scales.dtype != torch.float32 or scales.dim() != 1 or scales.numel() != n_segs
            or scales.device != device):
        raise ValueError(f"{name} must be float32, 1-D, one per segment ({n_segs}), on "
                         f"{device}")
    if scales.numel() and not bool((scales >= 0).all()):
        raise ValueError(f"{name} must be >= 0 (the scales ef_sign returns)")
    return scales.detach().contiguous()


def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float, not {type(alpha).__name__}")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], not {alpha!r}")


def ef_residual(p, scales, segments):
    """p <- p - copysign(scale_t, p) where p != +-0 in segment t, in place; returns p."""
    _check_tensor(p, "p")
    if p.dtype != torch.float32 or p.dim() != 1 or not p.is_contiguous():
        raise ValueError("p must be float32, 1-D, contiguous")
    pairs = _segment_pairs(segments, p.numel()).tolist()
    if scales.numel() != len(pairs):
        raise ValueError(f"scales must have one element per segment ({len(pairs)})")
    if scales.numel() and not bool((scales >= 0).all()):
        raise ValueError("scales must be >= 0 (the scales ef_sign returns)")
    return _torch.ef_residual(p, scales.to(p.device, torch.float32), pairs)


def ecx_sign(u, d1, d2, d_out, segments, alpha):
    """Fused ErrorCompensatedX scaled sign over p = u + (a*d1 - b*d2) (see the module doc)."""
    _check_alpha(alpha)
    n = _check_streams("d_out", d_out, u=u, d1=d1, d2=d2)
    if _native_for(u):
        return _cpu.ecx_sign(_native, u, d1, d2, d_out, _native_segments(segments, n), alpha)
    return _torch.ecx_sign(u.detach(), d1.detach(), d2.detach(), d_out,
                           _segment_pairs(segments, n).tolist(), alpha)


def ecx_coefficients(alpha):
    """(float32(2 - alpha), float32(1 - alpha)) as Python floats: ecx_sign's a and b."""
    return _torch.ecx_coefficients(alpha)


def tree_abs_sum(x):
    """sum |x_i| of a float32 tensor as a 0-dim float32 tensor, in the fixed order of the fused
    kernels (native/sg_fused.h; element-wise torch ops, the same bits on every device)."""
    _check_tensor(x, "x")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, not {x.dtype}")
    return _torch.tree_abs_sum(x)


def _check_momentum(g, m, m_out, beta):
    _check_streams("m_out", m_out, g=g, m=m)
    beta = float(beta)
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, not {beta}")
    return beta


def sign_scan(x):
    """signSGD's encode in one pass: sign bits, zero plane and zero count (see the module
    doc)."""
    _check_tensor(x, "x")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, not {x.dtype}")
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError("x must be 1-D and contiguous")
    if _native_for(x):
        return _cpu.sign_scan(_native, x)
    return _torch.sign_scan(x.detach())


def momentum_sign(g, m, m_out, beta):
    """Fused Signum momentum and sign bits (see the module doc)."""
    beta = _check_momentum(g, m, m_out, beta)
    if _native_for(g):
        return _cpu.momentum_sign(_native, g, m, m_out, beta)
    return _torch.momentum_sign(g.detach(), m.detach(), m_out, beta)


def momentum_absmax(g, m, m_out, beta):
    """Fused SSDM momentum and max |m_out| (see the module doc)."""
    beta = _check_momentum(g, m, m_out, beta)
    if _native_for(g):
        return _cpu.momentum_absmax(_native, g, m, m_out, beta)
    return _torch.momentum_absmax(g.detach(), m.detach(), m_out, beta)


def add_finite(a, b, out):
    """out = a + b (float32, rounded per element; the error-feedback compensation of the
    sparse compressors, written out of place). True when every sum is finite; out is written
    either way. a, b, out as ef_sign's g, e, e_out."""
    _check_streams("out", out, a=a, b=b)
    if _native_for(a):
        return _cpu.add_finite(_native, a, b, out)
    return _torch.add_finite(a.detach(), b.detach(), out)


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


# ---- sparse kernels --------------------------------------------------------------------------


class SparseIndexError(ValueError):
    """An index of sparse_sum's part `part` lies outside [0, n)."""

    def __init__(self, part, n):
        super().__init__(f"part {part} has indices outside [0, {n})")
        self.part = part


def _check_memory(p):
    _check_tensor(p, "p")
    if p.dtype != torch.float32:
        raise TypeError(f"p must be float32, not {p.dtype}")
    if p.dim() != 1 or not p.is_contiguous():
        raise ValueError("p must be 1-D and contiguous")
    if p.numel() > 1 << 31:
        raise ValueError("p has more than 2**31 elements (int32 indices)")


def _check_pairs(p, idx, vals, count):
    _check_tensor(idx, "idx")
    _check_tensor(vals, "vals")
    if idx.dtype != torch.int32:
        raise TypeError(f"idx must be int32, not {idx.dtype}")
    if vals.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"vals must be float32 or float16, not {vals.dtype}")
    for t, name in ((idx, "idx"), (vals, "vals")):
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be 1-D and contiguous")
        if t.device != p.device:
            raise ValueError(f"{name} is on {t.device}, p on {p.device}")
    if count is not None and not idx.numel() == vals.numel() == count:
        raise ValueError(f"idx and vals have {idx.numel()} and {vals.numel()} elements, the "
                         f"segments take {count}")
    if idx.numel() != vals.numel():
        raise ValueError("idx and vals must have the same number of elements")


def _segments(segments, n):
    """(S, 3) int64 CPU tensor of validated (offset, size, k) triples, and sum(min(k, size))."""
    if isinstance(segments, torch.Tensor):
        segs = segments.detach().to("cpu", torch.int64).reshape(-1, 3)
    else:
        segs = torch.tensor([[operator.index(v) for v in s] for s in segments],
                            dtype=torch.int64).reshape(-1, 3)
    o, s, k = segs.unbind(1)
    if segs.numel() and (bool((o < 0).any()) or bool((s < 0).any()) or bool((k < 0).any())
                         or bool((o[1:] < (o + s)[:-1]).any()) or int((o + s).max()) > n):
        raise ValueError(f"segments must be (offset, size, k) with k >= 0 and ascending, "
                         f"non-overlapping ranges inside p ({n} elements)")
    return segs.contiguous(), int(torch.minimum(k, s).sum())


def topk_take(p, segments, idx, vals):
    """Per segment the min(k, size) largest magnitudes, taken into idx/vals (see module doc)."""
    _check_memory(p)
    if _native_for(p) and isinstance(segments, torch.Tensor):
        # the extension checks the triples and the count itself (ValueError), in C: cheaper
        # than these torch ops on a per-bucket call
        _check_pairs(p, idx, vals, None)
        _cpu.topk_take(_native, p, segments.detach().to("cpu", torch.int64).reshape(-1, 3),
                       idx, vals)
        return
    segs, total = _segments(segments, p.numel())
    _check_pairs(p, idx, vals, total)
    if _native_for(p):
        _cpu.topk_take(_native, p, segs, idx, vals)
    else:
        _torch.topk_take(p, segs.tolist(), idx, vals)


def topk_take_sum(g, e, p, segments, idx, vals):
    """p = g + e, then topk_take(p, ...); False on NaN/Inf (see module doc)."""
    _check_streams("p", p, g=g, e=e)
    _check_memory(p)
    if _native_for(p) and isinstance(segments, torch.Tensor):
        _check_pairs(p, idx, vals, None)     # the extension checks the triples (topk_take)
        return _cpu.topk_take_sum(_native, g, e, p, segments.detach().to("cpu", torch.int64)
                                  .reshape(-1, 3), idx, vals)
    segs, total = _segments(segments, p.numel())
    _check_pairs(p, idx, vals, total)
    if _native_for(p):
        return _cpu.topk_take_sum(_native, g, e, p, segs, idx, vals)
    if not _torch.add_finite(g.detach(), e.detach(), p):
        return False
    _torch.topk_take(p, segs.tolist(), idx, vals)
    return True


def _check_lam(lam):
    lam = float(lam)
    if not lam >= 0.0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return lam


def threshold_count(p, lam):
    """Number of i with |p_i| >= float32(lam)."""
    _check_memory(p)
    lam = _check_lam(lam)
    if _native_for(p):
        return _cpu.threshold_count(_native, p, lam)
    return _torch.threshold_count(p, lam)


def threshold_take(p, lam, idx, vals):
    """Takes every i with |p_i| >= float32(lam) into idx/vals (see module doc)."""
    _check_memory(p)
    lam = _check_lam(lam)
    _check_pairs(p, idx, vals, None)
    if _native_for(p):
        _cpu.threshold_take(_native, p, lam, idx, vals)
    else:
        _torch.threshold_take(p, lam, idx, vals)


def _check_divisor(divisor) -> float:
    """divisor as the float32 value both backends divide by: positive and finite."""
    if isinstance(divisor, bool) or not isinstance(divisor, (int, float)):
        raise TypeError(f"divisor must be a number, not {type(divisor).__name__}")
    try:
        with np.errstate(over="ignore"):
            d32 = float(np.float32(divisor))
    except OverflowError:
        d32 = math.inf
    if not 0 < d32 < math.inf:
        raise ValueError(f"divisor must be positive and finite in float32, not {divisor!r}")
    return d32


def sparse_sum(parts, n, out=None, divisor=1):
    """Sum in part order of sparse (idx, vals) and dense (None, vals) parts, divided by
    divisor (see module doc)."""
    n = _check_n(n)
    divisor = _check_divisor(divisor)
    parts = list(parts)
    result = _output(out, n, torch.float32, torch.device("cpu") if not parts else
                     parts[0][1].device, (torch.float32,))
    for r, part in enumerate(parts):
        if not (isinstance(part, tuple) and len(part) == 2):
            raise TypeError(f"part {r} must be a tuple (idx or None, vals)")
        idx, vals = part
        _check_tensor(vals, "vals")
        if vals.dim() != 1 or not vals.is_contiguous() or vals.device != result.device:
            raise ValueError(f"part {r}: vals must be 1-D, contiguous, on {result.device}")
        if idx is None:
            if vals.dtype != torch.float32 or vals.numel() != n:
                raise ValueError(f"part {r}: a dense part needs n = {n} float32 values")
        else:
            _check_pairs(vals, idx, vals, None)
    if all(_native_for(v) for _, v in parts) and _native_for(result):
        bad = _cpu.sparse_sum(_native, parts, n, result, divisor)
    else:
        bad = _torch.sparse_sum(parts, n, result.view(-1), divisor)
    if bad >= 0:
        raise SparseIndexError(bad, n)
    return result
