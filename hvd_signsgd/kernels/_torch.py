"""Pure-torch kernels: the fallback for GPU tensors and for a missing native extension.

Vectorised torch ops only (Python loops go over the 8 bit positions or the ranks, never over
elements), on any device. Arguments are validated by the public face (``__init__.py``); the
results are bit-identical to the native kernels (native/), which follow the same formulas.
"""
import struct

import numpy as np
import torch

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_FLT_MAX = 3.4028234663852886e38
# Elements per step of the stochastic hash: on CPU the int64 temporaries stay in cache;
# on GPU, fewer launches matter more.
_STOCHASTIC_CHUNK = {"cpu": 1 << 16}
_STOCHASTIC_CHUNK_DEFAULT = 1 << 22


def nbytes(n):
    return (n + 7) // 8


def _shifts(device):
    return torch.arange(8, dtype=torch.uint8, device=device)


def sign_bits(x):
    """IEEE sign bit of every element of x (any strides), flattened in logical order."""
    return (x.view(_INT_VIEW[x.dtype]) < 0).reshape(-1)


def pack_bools(neg):
    """1-D bool tensor -> uint8 tensor, element 8j+i in bit i of byte j, padding bits 0."""
    n = neg.numel()
    lanes = torch.zeros(nbytes(n) * 8, dtype=torch.uint8, device=neg.device)
    lanes[:n] = neg
    lanes = lanes.view(-1, 8) << _shifts(neg.device)
    return lanes.sum(dim=1, dtype=torch.uint8)  # distinct bits: the sum is an OR


def unpack_bools(bits, n):
    """First n bits of the flat uint8 tensor bits as a bool tensor."""
    b = bits.reshape(-1)[: nbytes(n)]
    return ((b.unsqueeze(1) >> _shifts(b.device)) & 1).reshape(-1)[:n].bool()


def pack_signs(x):
    return pack_bools(sign_bits(x))


def count_zeros(x):
    return x.numel() - int(torch.count_nonzero(x))


# ---- stochastic signs ------------------------------------------------------------------------
# The exact formula of native/sg_scalar.h, all arithmetic modulo 2^32 / 2^64:
#   key = splitmix64(seed);  c = offset + i
#   h = mix32(lo32(c) ^ lo32(key));  h = mix32(h ^ hi32(c) ^ hi32(key));  u = h >> 8
#   mix32(x): x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
#   element i is positive (bit 0) iff float32(u) < 2^23 + x_i * c in float32 arithmetic,
#   c = float32(min(2^23 / norm, FLT_MAX)) with the division in float64 (c = 0 if norm == 0)
# 32-bit values live in int64 tensors (so every shift is logical), and products are split so
# that no int64 product overflows.


def splitmix64(seed):
    z = (seed + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _mul32(x, c):
    """x * c mod 2^32 for int64 x in [0, 2^32): two 16-bit halves of c, no overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform24(key, counters):
    """24-bit uniforms for the int64 counters (offset + i)."""
    h = _mix32((counters & _M32) ^ (key & _M32))
    h = _mix32(h ^ (counters >> 32) ^ (key >> 32))
    return h >> 8


def threshold_scale(norm):
    """c = float32(min(2^23 / norm, FLT_MAX)), 0 when norm == 0 (fair coins).

    A float (holding a float32 value) for a float norm, a float32 0-dim tensor for a tensor."""
    if isinstance(norm, torch.Tensor):
        norm = norm.detach().reshape(()).to(torch.float64)
        c = (8388608.0 / norm).clamp(max=_FLT_MAX)
        return torch.where(norm == 0, torch.zeros_like(c), c).to(torch.float32)
    c = 0.0 if norm == 0 else min(8388608.0 / norm, _FLT_MAX)
    return struct.unpack("f", struct.pack("f", c))[0]  # round to float32


def pack_stochastic_signs(x, norm, seed, offset):
    flat = x.reshape(-1)
    n = flat.numel()
    key = splitmix64(seed & _M64)
    c = threshold_scale(norm)
    neg = torch.empty(n, dtype=torch.bool, device=x.device)
    chunk = _STOCHASTIC_CHUNK.get(x.device.type, _STOCHASTIC_CHUNK_DEFAULT)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        counters = torch.arange(start, stop, dtype=torch.int64, device=x.device) + offset
        u = uniform24(key, counters).to(torch.float32)
        t = flat[start:stop].to(torch.float32) * c + 8388608.0
        neg[start:stop] = ~(u < t)  # NaN thresholds give "negative", as in C
    return pack_bools(neg)


# ---- unpack and vote -------------------------------------------------------------------------


def scale_value(scale, dtype, device):
    """+scale as a 0-dim tensor: rounded to float32, then to dtype (round to nearest even)."""
    if isinstance(scale, torch.Tensor):
        s = scale.detach().to(device=device, dtype=torch.float32)
    else:
        s = torch.tensor(float(scale), dtype=torch.float32, device=device)
    return s.reshape(()).to(dtype)


def unpack_signs(bits, n, scale, out):
    """Writes +-scale into out[:n] (a flat view); negation flips the sign bit exactly."""
    value = scale_value(scale, out.dtype, out.device)
    torch.where(unpack_bools(bits, n), -value, value, out=out)


def vote(rows, n, mode, weights, out, zeros=None):
    """rows: uint8 (n_ranks, >= ceil(n/8)); weights: None or float32 (n_ranks,) on rows' device;
    mode: "majority", "sum" or "mean" (unweighted); zeros (weighted only): None or the ranks'
    zero planes, shaped as rows, whose set bits make that rank's term +0.0.

    Unweighted: exact integer counts. Weighted: float32 additions from +0.0 in rank order."""
    majority = mode == "majority"
    n_ranks = rows.shape[0]
    if weights is None:
        count = torch.zeros(n, dtype=torch.int32, device=rows.device)
        for m in range(n_ranks):
            count += unpack_bools(rows[m], n)
        total = n_ranks - 2 * count
        out.copy_(total.sign() if majority else total)
        if mode == "mean":
            out.div_(n_ranks)
        return
    out.zero_()
    for m in range(n_ranks):
        w = weights[m]
        term = torch.where(unpack_bools(rows[m], n), -w, w)
        if zeros is not None:
            term.masked_fill_(unpack_bools(zeros[m], n), 0.0)
        out.add_(term)
    if majority:
        out.copy_((out > 0).to(torch.float32) - (out < 0).to(torch.float32))


# ---- fused error-feedback scaled sign (native/sg_fused.h) ------------------------------------


def tree_abs_sum(x):
    """sum |x_i| as a float32 0-dim tensor, in the fixed order of native/sg_fused.h: zero-pad
    to a multiple of 64; each block of 64 is 8 rows of 8 lanes, the rows added in order per
    lane, then the lanes as ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)); repeat on the
    block sums until one value is left (0 for an empty x). Element-wise adds only, so every
    device gives the same bits."""
    t = x.reshape(-1).abs()
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    while True:
        pad = -t.numel() % 64
        if pad:
            t = torch.cat([t, t.new_zeros(pad)])
        rows = t.view(-1, 8, 8)
        v = rows[:, 0]
        for r in range(1, 8):
            v = v + rows[:, r]
        a = v[:, :4] + v[:, 4:]
        t = (a[:, 0] + a[:, 2]) + (a[:, 1] + a[:, 3])
        if t.numel() == 1:
            return t[0]


def ef_sign(g, e, e_out, segments):
    """The fused error-feedback scaled sign (see kernels.ef_sign); segments: (offset, size)
    pairs. Returns None when a p or a scale is not finite (e_out then unspecified), else
    (bits, zplane, scales, zeros)."""
    return scaled_sign_residual(g + e, e_out, segments)


def ef_residual(p, scales, segments):
    """p <- p - copysign(scale_t, p) where p != +-0 in segment t (gaps unchanged); returns p."""
    for t, (o, s) in enumerate(segments):
        seg = p[o:o + s]
        seg.sub_(torch.copysign(scales[t], seg).masked_fill_(seg == 0, 0.0))   # +-0 - 0 = +-0
    return p


def ef_sign_deferred(g, p, prev_scales, p_out, segments):
    """ef_sign over g + ef_residual(p, prev_scales) (see kernels.ef_sign_deferred); p_out gets
    that sum. None when a p or a scale is not finite."""
    torch.add(g, ef_residual(p.clone(), prev_scales, segments), out=p_out)
    return scaled_sign_residual(p_out, torch.empty_like(p_out), segments)


def ecx_coefficients(alpha):
    """(a, b) = (float32(2 - alpha), float32(1 - alpha)) as Python floats (exact in float32),
    the rounding native/module.c makes."""
    return (float(np.float32(2.0 - alpha)), float(np.float32(1.0 - alpha)))


def ecx_compensated(u, d1, d2, alpha):
    """p = u + (a*d1 - b*d2) in float32, each operation rounded in this order (sg_fused.h);
    a tensor's product with a Python float that float32 represents exactly is one float32
    rounding on every device."""
    a, b = ecx_coefficients(alpha)
    return u + (d1 * a - d2 * b)


def ecx_sign(u, d1, d2, d_out, segments, alpha):
    """The fused ErrorCompensatedX scaled sign (see kernels.ecx_sign): ef_sign over
    p = ecx_compensated(u, d1, d2, alpha)."""
    return scaled_sign_residual(ecx_compensated(u, d1, d2, alpha), d_out, segments)


def ecx_sign_deferred(u, p1, prev1, p2, prev2, p_out, segments, alpha):
    """ecx_sign over the residuals of p1 and p2 (see kernels.ecx_sign_deferred); p_out gets
    the compensated p. None when a p or a scale is not finite."""
    d1 = ef_residual(p1.clone(), prev1, segments)
    d2 = ef_residual(p2.clone(), prev2, segments)
    p_out.copy_(ecx_compensated(u, d1, d2, alpha))
    return scaled_sign_residual(p_out, torch.empty_like(p_out), segments)


def scaled_sign_residual(p, e_out, segments):
    """ef_sign's outputs for a given p (e_out <- p - q); None when p or a scale is NaN/Inf."""
    if not bool(torch.isfinite(p).all()):
        return None
    zero = p == 0
    scales = torch.zeros(len(segments), dtype=torch.float32, device=p.device)
    zeros = []
    for t, (o, s) in enumerate(segments):
        z = int(zero[o:o + s].sum())
        zeros.append(z)
        count = torch.tensor(float(max(s - z, 1)), dtype=torch.float32, device=p.device)
        scales[t] = tree_abs_sum(p[o:o + s]) / count
    if not bool(torch.isfinite(scales).all()):
        return None
    e_out.copy_(p)
    for t, (o, s) in enumerate(segments):
        seg = p[o:o + s]
        torch.where(zero[o:o + s], seg, seg - torch.copysign(scales[t], seg), out=e_out[o:o + s])
    zeros.append(int(zero.sum()) - sum(zeros))
    return pack_signs(p), pack_bools(zero), scales, torch.tensor(zeros, dtype=torch.int64)


def momentum_update(g, m, m_out, beta):
    """m_out <- (float32(beta) * m) + (float32(1 - beta) * g), each operation rounded in
    float32: torch's CPU multiply by a Python float rounds the factor to float32 and computes
    in float32, and adding two tensors (alpha 1) rounds once even where it uses an FMA
    (x * 1 is exact). Not add_(g, alpha=1 - beta): its FMA body and its scalar tail round
    differently. The methods' unfused path uses this too (hvd_signsgd.methods.sign)."""
    torch.mul(m, beta, out=m_out)
    return m_out.add_(torch.mul(g, 1.0 - beta))


def sign_scan(x):
    """signSGD's one-pass encode (see kernels.sign_scan)."""
    if not bool(torch.isfinite(x).all()):
        return None
    zero = x == 0
    return pack_signs(x), pack_bools(zero), int(zero.sum())


def momentum_sign(g, m, m_out, beta):
    """The fused Signum momentum (see kernels.momentum_sign)."""
    momentum_update(g, m, m_out, beta)
    if not bool(torch.isfinite(m_out).all()):
        return None
    zero = m_out == 0
    return pack_signs(m_out), pack_bools(zero), int(zero.sum())


def momentum_absmax(g, m, m_out, beta):
    """The fused SSDM momentum (see kernels.momentum_absmax)."""
    momentum_update(g, m, m_out, beta)
    mag = magnitude_keys(m_out)
    worst = int(mag.max()) if mag.numel() else 0
    if worst >= 0x7F800000:
        return None
    absmax = torch.tensor(worst, dtype=torch.int32).view(torch.float32)
    return float(absmax), int((mag == 0).sum())


def add_finite(a, b, out):
    """The compensation add (see kernels.add_finite)."""
    torch.add(a, b, out=out)
    mag = magnitude_keys(out)
    return not bool((mag >= 0x7F800000).any())


# ---- sparse: Top-k / threshold with fused error feedback, scatter-add decode ----------------
# The native rules (native/sg_sparse.h): magnitude is the bit pattern with the sign cleared,
# compared as an integer (|v| for non-NaN v, +0 == -0, NaN above Inf); ties at the cut go to
# the lowest position; a taken v is sent as float32 or float16(clamp(v, +-65504)) and the
# memory keeps v - (v as sent).

FP16_MAX = 65504.0


def magnitude_keys(x):
    return x.view(torch.int32) & 0x7FFFFFFF


def topk_positions(keys, k):
    """Ascending positions of the k largest keys, ties to the lowest positions."""
    d = keys.numel()
    if k >= d:
        return torch.arange(d, device=keys.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=keys.device)
    kth = torch.kthvalue(keys, d - k + 1).values
    gt = keys > kth
    eq = keys == kth
    keep = gt | (eq & (eq.cumsum(0) <= k - gt.sum()))
    return keep.nonzero().squeeze(1)


def take(p, pos, idx, vals):
    """Writes pos (int64, global) to idx and p[pos] to vals; p[pos] -= the value as sent."""
    v = p[pos]
    if vals.dtype == torch.float32:
        q = v
        vals.copy_(v)
    else:
        h = v.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
        vals.copy_(h)
        q = h.to(torch.float32)
    p[pos] = v - q
    idx.copy_(pos)


def topk_take(p, segments, idx, vals):
    """segments: list of (offset, size, k) triples, validated."""
    keys = magnitude_keys(p)
    pos = [o + topk_positions(keys[o:o + s], k) for o, s, k in segments]
    pos = torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long, device=p.device)
    take(p, pos, idx, vals)


def threshold_key(lam):
    """The key of float32(lam): round to nearest even, +inf above the float32 range."""
    return int(torch.tensor(lam, dtype=torch.float64).to(torch.float32).view(torch.int32))


def threshold_count(p, lam):
    return int((magnitude_keys(p) >= threshold_key(lam)).sum())


def threshold_take(p, lam, idx, vals):
    pos = (magnitude_keys(p) >= threshold_key(lam)).nonzero().squeeze(1)
    if pos.numel() != idx.numel():
        raise ValueError(f"idx and vals have {idx.numel()} elements, but {pos.numel()} elements "
                         f"of p reach the threshold")
    take(p, pos, idx, vals)


def sparse_sum(parts, n, out, divisor=1):
    """As the native sparse_sum: -1, or the first part with an index outside [0, n)."""
    for r, (idx, _) in enumerate(parts):
        if idx is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            return r
    out.zero_()
    for idx, vals in parts:
        if idx is None:
            out.add_(vals)
        elif idx.numel():
            out.index_add_(0, idx, vals.to(torch.float32))
    if divisor != 1:
        out.div_(divisor)
    return -1
