"""Native kernels on CPU tensors: hands the tensors' memory to hvd_signsgd._native as numpy
views (no copies for contiguous inputs; outputs are allocated with torch.empty).

Arguments are validated by the public face (``__init__.py``); the extension re-checks what
it needs, so a mistake raises instead of crashing.
"""
import torch

from ._torch import nbytes


def buffer(t):
    """numpy view of a CPU tensor; bfloat16 (no numpy dtype) travels as its int16 bits."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def _contiguous(t):
    return t if t.is_contiguous() else t.contiguous()


def pack_signs(native, x):
    out = torch.empty(nbytes(x.numel()), dtype=torch.uint8)
    native.pack_signs(buffer(_contiguous(x)), buffer(out))
    return out


def pack_stochastic_signs(native, x, norm, seed, offset):
    out = torch.empty(nbytes(x.numel()), dtype=torch.uint8)
    native.pack_stochastic_signs(buffer(_contiguous(x)), float(norm), seed, offset, buffer(out))
    return out


def unpack_signs(native, bits, n, scale, out):
    """out: a contiguous CPU tensor of n elements."""
    native.unpack_signs(buffer(_contiguous(bits)), n, buffer(out), float(scale))


def vote(native, rows, n, mode, weights, out):
    """rows: uint8 (n_ranks, >= ceil(n/8)) CPU tensor; weights: None or float32 CPU tensor."""
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    w = None if weights is None else buffer(_contiguous(weights))
    native.vote(buffer(rows), n, buffer(out), mode, w)


def scaled_vote(native, rows, segments, weights, out, zeros=None):
    """rows, zeros (or None): uint8 (n_ranks, bytes) CPU tensors; segments int64 (S, 2),
    weights float32."""
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    if zeros is not None and zeros.shape[1] > 1 and zeros.stride(1) != 1:
        zeros = zeros.contiguous()
    native.scaled_vote(buffer(rows), buffer(_contiguous(segments)), buffer(_contiguous(weights)),
                       buffer(out), None if zeros is None else buffer(zeros))


def topk_take(native, p, segments, idx, vals):
    """p, idx, vals: contiguous CPU tensors; segments: int64 (S, 3) CPU tensor."""
    native.topk_take(buffer(p), buffer(_contiguous(segments)), buffer(idx), buffer(vals))


def topk_take_sum(native, g, e, p, segments, idx, vals):
    """As topk_take, with g and e: contiguous float32 CPU tensors of p's length."""
    return native.topk_take_sum(buffer(g), buffer(e), buffer(p), buffer(_contiguous(segments)),
                                buffer(idx), buffer(vals))


def threshold_count(native, p, lam):
    return native.threshold_count(buffer(_contiguous(p)), lam)


def threshold_take(native, p, lam, idx, vals):
    native.threshold_take(buffer(p), lam, buffer(idx), buffer(vals))


def sparse_sum(native, parts, n, out, divisor):
    """parts: (idx int32 or None, vals) pairs of contiguous CPU tensors. Returns -1 or the
    first part with an index outside [0, n) (out untouched then)."""
    return native.sparse_sum([(None if i is None else buffer(i), buffer(v)) for i, v in parts],
                             n, buffer(out), float(divisor))


def count_zeros(native, x):
    return native.count_zeros(buffer(_contiguous(x)))


def _scaled_sign_outputs(n, segments):
    """bits, zero plane, per-segment scales and zero counts: the fused sign kernels' outputs."""
    nb = nbytes(n)
    return (torch.empty(nb, dtype=torch.uint8), torch.empty(nb, dtype=torch.uint8),
            torch.empty(segments.shape[0], dtype=torch.float32),
            torch.empty(segments.shape[0] + 1, dtype=torch.int64))


def ef_sign(native, g, e, e_out, segments):
    """segments: int64 (S, 2) CPU tensor. None when something is not finite."""
    out = _scaled_sign_outputs(g.numel(), segments)
    if not native.ef_sign(buffer(g), buffer(e), buffer(e_out), buffer(segments),
                          *map(buffer, out)):
        return None
    return out


def ef_sign_deferred(native, g, p, prev_scales, p_out, segments):
    """segments: int64 (S, 2) CPU tensor. None when something is not finite."""
    out = _scaled_sign_outputs(g.numel(), segments)
    if not native.ef_sign_deferred(buffer(g), buffer(p), buffer(p_out), buffer(segments),
                                   *map(buffer, out), buffer(prev_scales)):
        return None
    return out


def ecx_sign_deferred(native, u, p1, prev1, p2, prev2, p_out, segments, alpha):
    """segments: int64 (S, 2) CPU tensor. None when something is not finite."""
    out = _scaled_sign_outputs(u.numel(), segments)
    if not native.ecx_sign_deferred(buffer(u), buffer(p1), buffer(p2), buffer(p_out),
                                    buffer(segments), *map(buffer, out), buffer(prev1),
                                    buffer(prev2), float(alpha)):
        return None
    return out


def ecx_sign(native, u, d1, d2, d_out, segments, alpha):
    """segments: int64 (S, 2) CPU tensor. None when something is not finite."""
    out = _scaled_sign_outputs(u.numel(), segments)
    if not native.ecx_sign(buffer(u), buffer(d1), buffer(d2), buffer(d_out), buffer(segments),
                           *map(buffer, out), float(alpha)):
        return None
    return out


def momentum_sign(native, g, m, m_out, beta):
    """None when something is not finite."""
    nb = nbytes(g.numel())
    bits = torch.empty(nb, dtype=torch.uint8)
    zplane = torch.empty(nb, dtype=torch.uint8)
    zeros = native.momentum_sign(buffer(g), buffer(m), buffer(m_out), beta, buffer(bits),
                                 buffer(zplane))
    return None if zeros is None else (bits, zplane, zeros)


def momentum_absmax(native, g, m, m_out, beta):
    return native.momentum_absmax(buffer(g), buffer(m), buffer(m_out), beta)


def add_finite(native, a, b, out):
    return native.add_finite(buffer(a), buffer(b), buffer(out))


def sign_scan(native, x):
    """None when something is not finite."""
    nb = nbytes(x.numel())
    bits = torch.empty(nb, dtype=torch.uint8)
    zplane = torch.empty(nb, dtype=torch.uint8)
    zeros = native.sign_scan(buffer(x), buffer(bits), buffer(zplane))
    return None if zeros is None else (bits, zplane, zeros)
