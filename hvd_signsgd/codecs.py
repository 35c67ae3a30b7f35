"""Codecs: stateless translations between a bucket's flat float32 buffer and a wire payload.

A codec knows the bytes and nothing of time: error memory, momentum and schedules live in the
methods (methods.py). Each codec offers
    encode(x, layout, ...) -> uint8 payload (wire.py format)
    aggregate(payloads, layout, ...) -> float32 dense vector of layout.numel
and `aggregate` works straight from the gathered bytes (the vote counts packed bits; it never
materialises one float vector per rank).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import kernels, wire


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a bucket sits in its flat buffer. Identical on every rank.

    Segment offsets are rounded up to a multiple of 8 elements, so every tensor starts on a byte
    boundary of the packed sign bits and per-tensor scales can be applied to byte slices. The gap
    elements stay 0 and are never written back to a gradient.
    """
    offsets: tuple
    sizes: tuple

    @property
    def numel(self) -> int:
        return self.offsets[-1] + self.sizes[-1] if self.sizes else 0

    @property
    def real_numel(self) -> int:
        return sum(self.sizes)

    @staticmethod
    def for_sizes(sizes) -> Layout:
        offsets, pos = [], 0
        for s in sizes:
            offsets.append(pos)
            pos = (pos + s + 7) // 8 * 8
        return Layout(tuple(offsets), tuple(sizes))

    def segments(self):
        return zip(self.offsets, self.sizes)


def _gathered_rows(payloads: list[wire.Payload]) -> torch.Tensor:
    """The packed sign bits of every rank as one (n_ranks, nbytes) strided view when the
    payloads lie at a fixed stride in one buffer (the usual allgather case), else a stacked copy."""
    bodies = [p.body for p in payloads]
    if len(bodies) > 1:
        stride = bodies[1].data_ptr() - bodies[0].data_ptr()
        if stride > 0 and all(b.data_ptr() - bodies[0].data_ptr() == i * stride
                              for i, b in enumerate(bodies)):
            base = bodies[0]
            return base.as_strided((len(bodies), base.numel()), (stride, 1))
    return torch.stack(bodies)


# --- zero marks (wire.FLAG_ZEROS) ---------------------------------------------------------------
#
# sign(0) = 0: a coordinate that is exactly 0 (+0 or -0) on a rank does not vote. The encoder
# counts zeros in one pass (kernels.count_zeros); only when the bucket's real elements hold
# one does it mark them, so dense gradients are encoded exactly as before.


@functools.lru_cache(maxsize=256)
def gap_index(layout: Layout) -> torch.Tensor | None:
    """The layout's alignment gaps (elements no tensor covers), ascending int64, or None."""
    gaps = [j for o, s in layout.segments() for j in range(o + s, (o + s + 7) // 8 * 8)
            if j < layout.numel]
    return torch.tensor(gaps, dtype=torch.long) if gaps else None


def count_zeros(x: torch.Tensor, layout: Layout | None = None, total: int | None = None) -> int:
    """Number of exact zeros of x to mark: 0 when the real elements (layout's segments; all
    of x without a layout) hold none, even if alignment gaps are 0; else every zero of x,
    gaps included (their value is never read). total: kernels.count_zeros(x) when the caller
    has it (a fused kernel counted them)."""
    z = kernels.count_zeros(x) if total is None else total
    if z and layout is not None:
        gaps = gap_index(layout)
        if gaps is not None and z == int(torch.count_nonzero(x[gaps] == 0)):
            return 0
    return z


def _plane_positions(plane: torch.Tensor, n: int) -> torch.Tensor:
    """The positions < n of a bitplane's set bits, ascending, as int32. Only the non-zero
    bytes are expanded: a few marks cost one pass over n/8 bytes, not n bools."""
    at = torch.nonzero(plane).reshape(-1)
    lanes = torch.arange(8)
    set_bits = ((plane[at].unsqueeze(1) >> lanes.to(torch.uint8)) & 1).bool()
    pos = (at.unsqueeze(1) * 8 + lanes).masked_select(set_bits)
    return pos[pos < n].to(torch.int32)


def _marks_from_plane(plane: torch.Tensor, bits: torch.Tensor, z: int, n: int):
    """As _mark_zeros, from the bitplane of x == 0 (the fused kernels write it)."""
    if z == n:
        return None, None
    if 4 * z < (n + 7) // 8:
        marks = _plane_positions(plane, n)
    else:
        marks = plane
    return bits.bitwise_and_(plane.bitwise_not()), marks


@functools.lru_cache(maxsize=256)
def segment_pairs(layout: Layout) -> torch.Tensor:
    """The layout's (offset, size) pairs as the int64 (S, 2) tensor the fused kernels take."""
    return torch.tensor(list(layout.segments()), dtype=torch.int64).reshape(-1, 2)


def _mark_zeros(x: torch.Tensor, bits: torch.Tensor | None, z: int):
    """(sign bits with every marked position cleared, marks for wire.build) for z >= 1."""
    n = x.numel()
    if z == n:
        return None, None
    return _marks_from_plane(_zero_plane_of(x.reshape(-1)), bits, z, n)


def _zero_plane_of(x: torch.Tensor) -> torch.Tensor:
    """The bitplane of x == 0. For finite float32 x on the native kernels, one pass of
    kernels.sign_scan (its sign bits are dropped): torch's x == 0 and its nonzero() took three
    passes and n bools. sign_scan's torch form would add passes, so other x take x == 0."""
    if kernels.backend() == "native" and x.is_cpu and x.dtype == torch.float32 \
            and x.is_contiguous():
        found = kernels.sign_scan(x)
        if found is not None:
            return found[1]
    return kernels.pack_bits(x == 0)


def _encode_signs(codec: str, x: torch.Tensor, z: int, pack, n_scales: int = 0,
                  scales: torch.Tensor | None = None) -> torch.Tensor:
    """The payload of sign bits `pack()` of x, with x's z zeros marked (z = 0: none)."""
    if not z:
        return wire.build(wire.Header(codec, x.numel(), n_scales=n_scales), scales=scales,
                          body=pack())
    h = wire.Header(codec, x.numel(), n_scales=n_scales, nnz=z, flags=wire.FLAG_ZEROS)
    bits, marks = _mark_zeros(x, None if z == x.numel() else pack(), z)
    return wire.build(h, scales=scales, body=bits, zeros=marks)


def _has_zeros(payloads) -> bool:
    return any(p.header.zero_form() is not None for p in payloads)


def _apply_zeros(payload: wire.Payload, values: torch.Tensor) -> None:
    """values (this rank's decoded floats, n elements) <- +0.0 where the payload marks zeros."""
    form = payload.header.zero_form()
    if form == "list":
        values[payload.zeros.long()] = 0.0
    elif form == "plane":
        values.masked_fill_(kernels.unpack_bits(payload.zeros, values.numel()), 0.0)
    elif form == "all":
        values.zero_()


def _zero_plane(payload: wire.Payload, n: int, out: torch.Tensor | None = None):
    """The payload's marks as a bitplane of ceil(n/8) bytes (built from a list if need be),
    written into out (ceil(n/8) zero bytes) if given."""
    if payload.header.zero_form() == "plane":
        return payload.zeros if out is None else out.copy_(payload.zeros)
    return _positions_to_plane(payload.zeros.long(), n, out=out)


def _positions_to_plane(pos: torch.Tensor, n: int, out: torch.Tensor | None = None):
    """Unique int64 positions in [0, n) -> bitplane (distinct bits: the sum is an OR), in
    out (ceil(n/8) zero bytes) if given."""
    plane = torch.zeros((n + 7) // 8, dtype=torch.uint8) if out is None else out
    plane.index_put_((pos >> 3,), (1 << (pos & 7)).to(torch.uint8), accumulate=True)
    return plane


def _count_vote_with_zeros(payloads, n: int, majority: bool, out: torch.Tensor) -> torch.Tensor:
    """out <- sum_m (1 - z_m) s_m (exact integers), or its sign, in one bit-sliced vote from
    the packed bits. Each rank enters as two rows, its sign bits b and b | z: where z = 0 both
    are b (2 s_m), where z = 1 they are 0 and 1 (a marked coordinate's sign bit is 0), which
    cancel. So the vote over the 2-row pairs is 2 sum_m (1 - z_m) s_m: same sign, half of it
    exact. Ranks whose every coordinate is 0 add nothing and are left out."""
    rows = []
    for p in payloads:
        form = p.header.zero_form()
        if form == "all":
            continue
        rows.append(p.body)
        rows.append(p.body if form is None else p.body | _zero_plane(p, n))
    if not rows:
        return out.zero_()
    kernels.vote(torch.stack(rows), n, mode="majority" if majority else "sum", out=out)
    return out if majority else out.mul_(0.5)


def _voters_with_zeros(payloads, n: int):
    """(indices of the ranks that vote, their sign rows, their zero planes) for a weighted
    vote with marks (kernels.scaled_vote's zeros): a rank whose every coordinate is 0 is left
    out, since its terms would all be +0.0 (which changes no sum that starts from +0.0), and a
    rank without marks gets an empty plane. None for the rows when no rank votes."""
    keep = [m for m, p in enumerate(payloads) if p.header.zero_form() != "all"]
    if not keep:
        return keep, None, None
    voters = [payloads[m] for m in keep]
    planes = torch.zeros(len(voters), (n + 7) // 8, dtype=torch.uint8)
    for row, p in zip(planes, voters):
        if p.header.zero_form() is not None:
            _zero_plane(p, n, out=row)
    return keep, _gathered_rows(voters), planes


class Sign:
    """1 bit per element: the IEEE sign bit, and exact zeros marked (wire.FLAG_ZEROS) so that
    they do not vote: sign(0) = 0. A vector without zeros is the plain bit vector."""
    codec = "sign"

    def encode(self, x: torch.Tensor, flags: int = 0, layout: Layout | None = None,
               zeros: int | None = None) -> torch.Tensor:
        """layout: the bucket's (its gaps are not real zeros); zeros: count_zeros(x, layout)
        if the caller has it."""
        if flags & wire.FLAG_NONFINITE:
            return wire.build(wire.Header(self.codec, x.numel(), flags=flags))
        z = count_zeros(x, layout) if zeros is None else zeros
        return _encode_signs(self.codec, x, z, lambda: kernels.pack_signs(x))

    def encode_packed(self, x: torch.Tensor, bits: torch.Tensor, plane: torch.Tensor,
                      total_zeros: int, layout: Layout | None = None) -> torch.Tensor:
        """encode(x, layout=layout), byte for byte, from what a fused kernel (momentum_sign)
        wrote: bits = pack_signs(x), plane = the bits of x == +-0, total_zeros = their
        number. bits may be modified."""
        z = count_zeros(x, layout, total=total_zeros)
        n = x.numel()
        if not z:
            return wire.build(wire.Header(self.codec, n), body=bits)
        h = wire.Header(self.codec, n, nnz=z, flags=wire.FLAG_ZEROS)
        bits, marks = _marks_from_plane(plane, bits, z, n)
        return wire.build(h, body=bits, zeros=marks)

    def decode(self, payload: wire.Payload, n: int) -> torch.Tensor:
        """One rank's message as floats: +1/-1 per element, 0 where a zero is marked."""
        if payload.header.zero_form() == "all":
            return torch.zeros(n)
        out = kernels.unpack_signs(payload.body, n)
        _apply_zeros(payload, out)
        return out

    def aggregate(self, payloads, n: int, mode: str = "majority",
                  weights=None, out=None, segments=None) -> torch.Tensor:
        """mode "majority": sign of the sum of signs (ties give 0); "mean": the sum divided by
        the number of ranks; weights scale each rank's signs before summing. A marked zero
        adds 0 (unweighted: exact integers; weighted: float32 additions in rank order, the
        zero's term left out). Payloads without marks take the fused kernels unchanged.
        out: a float32 buffer of n elements to write into (else a new one).
        segments: (offset, size) pairs that cover [0, n), offsets multiples of 8, with weights
        (len(segments), n_ranks), a row per segment (majority or sum only)."""
        if segments is not None:
            return self._segment_vote(payloads, n, mode, weights, out, segments)
        if not _has_zeros(payloads):
            rows = _gathered_rows(payloads)
            if mode == "majority" or (mode == "mean" and weights is None):
                return kernels.vote(rows, n, mode=mode, weights=weights, out=out)
            out = kernels.vote(rows, n, mode="sum", weights=weights, out=out)
            return out.div_(len(payloads)) if mode == "mean" else out
        if out is None:
            out = torch.zeros(n, dtype=torch.float32)
        if weights is None:
            _count_vote_with_zeros(payloads, n, mode == "majority", out)
            return out.div_(len(payloads)) if mode == "mean" else out
        w = kernels._weights(weights, len(payloads), torch.device("cpu"))
        keep, rows, planes = _voters_with_zeros(payloads, n)
        if rows is None:
            return out.zero_()
        kernels.scaled_vote(rows, [(0, n)], w[keep].unsqueeze(0), out, zeros=planes)
        if mode == "majority":
            return out.sign_()
        return out.div_(len(payloads)) if mode == "mean" else out

    @staticmethod
    def _segment_vote(payloads, n, mode, weights, out, segments) -> torch.Tensor:
        if mode not in ("majority", "sum"):
            raise ValueError(f"per-segment weights take mode 'majority' or 'sum', not {mode!r}")
        out = torch.zeros(n, dtype=torch.float32) if out is None else out.zero_()
        if not _has_zeros(payloads):
            kernels.scaled_vote(_gathered_rows(payloads), segments, weights, out)
        else:
            keep, rows, planes = _voters_with_zeros(payloads, n)
            if rows is not None:
                kernels.scaled_vote(rows, segments, weights[:, keep], out, zeros=planes)
        return out.sign_() if mode == "majority" else out


class StochasticSign(Sign):
    """sign(x_i + norm * u_i), u ~ U[-1, 1]: +1 with probability 1/2 + x_i / (2 norm).

    The random stream depends only on (seed, global element index), so it is independent of
    bucketing. The sender may attach its norm (one float32) for the norm-weighted mean.
    An exact zero x_i sends 0 (a mark), not a fair coin: 0 is the unbiased estimate of 0 with
    no variance, and it costs nothing on vectors without zeros.
    """
    codec = "stochastic_sign"

    def encode(self, x, norm: float, seed: int, offset: int, send_norm: bool = False,
               flags: int = 0, layout: Layout | None = None,
               zeros: int | None = None) -> torch.Tensor:
        n_scales = int(send_norm)
        if flags & wire.FLAG_NONFINITE:     # x may be None: nothing of it is sent
            h = wire.Header(self.codec, layout.numel, n_scales=n_scales, flags=flags)
            return wire.build(h, scales=torch.zeros(h.n_scales))
        z = count_zeros(x, layout) if zeros is None else zeros
        return _encode_signs(self.codec, x, z,
                             lambda: kernels.pack_stochastic_signs(x, norm, seed, offset),
                             n_scales, torch.tensor([norm], dtype=torch.float32))


class ScaledSign:
    """1 bit per element plus one float32 scale per tensor (Karimireddy et al.'s scaled sign,
    applied per tensor as in their reference code), with sign(0) = 0:

        q_i = scale_t * sign(x_i),  sign(0) = 0,  scale_t = ||x_t||_1 / nnz(x_t)

    nnz(x_t) = number of non-zero elements of tensor t (scale 0 when it has none). This is the
    least-squares scale for sign with sign(0) = 0, so coordinates that are exactly 0 neither
    move nor shrink the scale of the others; without zeros it is ||x_t||_1 / d_t, bit for bit
    the scale of plain scaled sign. Zeros travel as marks (wire.FLAG_ZEROS).

    `zeros` arguments below: count_zeros(x, layout) when the caller has it (0 = none; the
    fast path), else None (computed).
    """
    codec = "scaled_sign"

    @staticmethod
    def scales(x: torch.Tensor, layout: Layout, zeros: int | None = None) -> torch.Tensor:
        if zeros is None:
            zeros = count_zeros(x, layout)
        return torch.stack([
            x[o:o + s].abs().sum() / max(s - (kernels.count_zeros(x[o:o + s]) if zeros else 0), 1)
            for o, s in layout.segments()]).to(torch.float32)

    @staticmethod
    def tree_scales(x: torch.Tensor, layout: Layout, zeros: int | None = None) -> torch.Tensor:
        """As scales, with ||x_t||_1 summed in the fused kernels' fixed order
        (kernels.tree_abs_sum) and divided in float32: bit for bit the fused kernels' scales,
        for an unfused path that must match them."""
        if zeros is None:
            zeros = count_zeros(x, layout)
        out = torch.zeros(len(layout.sizes), dtype=torch.float32)
        for t, (o, s) in enumerate(layout.segments()):
            z = kernels.count_zeros(x[o:o + s]) if zeros else 0
            out[t] = kernels.tree_abs_sum(x[o:o + s]) / torch.tensor(float(max(s - z, 1)))
        return out

    @staticmethod
    def decompress_local(x: torch.Tensor, scales: torch.Tensor, layout: Layout,
                         zeros: int | None = None) -> torch.Tensor:
        """What this rank's payload decodes to (for the error memory): scale_t * sign(x),
        0 where x is 0."""
        q = torch.zeros_like(x)
        for (o, s), sc in zip(layout.segments(), scales.tolist()):
            torch.copysign(torch.tensor(sc), x[o:o + s], out=q[o:o + s])
        if zeros is None or zeros:
            q.masked_fill_(x == 0, 0.0)
        return q

    @staticmethod
    def subtract_local(x: torch.Tensor, scales: torch.Tensor, layout: Layout,
                       zeros: int | None = None) -> None:
        """x <- x - scale_t * sign(x), in place (the error-feedback residual), one tensor's
        segment at a time so that no bucket-sized temporary is allocated. Zeros stay."""
        for (o, s), sc in zip(layout.segments(), scales.tolist()):
            seg = x[o:o + s]
            q = torch.copysign(torch.tensor(sc), seg)
            if zeros is None or zeros:
                q.masked_fill_(seg == 0, 0.0)
            seg.sub_(q)

    def encode_fused(self, g: torch.Tensor, e: torch.Tensor, e_out: torch.Tensor,
                     layout: Layout) -> torch.Tensor | None:
        """Error feedback and encoding in one kernel (kernels.ef_sign): the payload of
        x = g + e, and e_out <- x - (x as decoded). None, with e_out unspecified, when x or a
        scale is NaN/Inf; g and e are only read. The payload's bytes are encode()'s for x,
        except that each scale sums |x| in the kernel's fixed order (a last-bit difference
        from torch's sum)."""
        return self._fused_payload(kernels.ef_sign(g, e, e_out, segment_pairs(layout)), layout)

    def encode_deferred(self, g: torch.Tensor, p: torch.Tensor, prev_scales: torch.Tensor,
                        p_out: torch.Tensor, layout: Layout):
        """encode_fused with the memory kept as the last x and its scales
        (kernels.ef_sign_deferred, one pass): the payload of x = g + e, e the residual of p
        with prev_scales, and p_out <- x. Returns (payload, x's scales), or None (p_out
        unspecified) when x or a scale is NaN/Inf. The payload's bytes are encode_fused's."""
        result = kernels.ef_sign_deferred(g, p, prev_scales, p_out, segment_pairs(layout))
        if result is None:
            return None
        return self._fused_payload(result, layout), result[2]

    def encode_ecx(self, u: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
                   d_out: torch.Tensor, layout: Layout, alpha: float) -> torch.Tensor | None:
        """As encode_fused for ErrorCompensatedX (kernels.ecx_sign): the payload of
        x = u + ((2 - alpha) d1 - (1 - alpha) d2) in the kernel's rounding order, and
        d_out <- x - (x as decoded). None, d_out unspecified, when x or a scale is NaN/Inf."""
        return self._fused_payload(
            kernels.ecx_sign(u, d1, d2, d_out, segment_pairs(layout), alpha), layout)

    def encode_ecx_deferred(self, u: torch.Tensor, kept, prev_scales, p_out: torch.Tensor,
                            layout: Layout, alpha: float):
        """encode_ecx with both memories kept as earlier x's and their scales
        (kernels.ecx_sign_deferred, one pass): kept = (p1, p2), prev_scales = (s1, s2); the
        payload of x = u + (a d1 - b d2), d the residuals, and p_out <- x. Returns (payload,
        x's scales), or None (p_out unspecified) when x or a scale is NaN/Inf. The payload's
        bytes are encode_ecx's."""
        (p1, p2), (s1, s2) = kept, prev_scales
        result = kernels.ecx_sign_deferred(u, p1, s1, p2, s2, p_out, segment_pairs(layout),
                                           alpha)
        if result is None:
            return None
        return self._fused_payload(result, layout), result[2]

    def _fused_payload(self, result, layout: Layout) -> torch.Tensor | None:
        """The payload from a fused kernel's (bits, zplane, scales, zeros), or None."""
        if result is None:
            return None
        bits, plane, scales, zeros = result
        n, n_scales = layout.numel, len(layout.sizes)
        real = int(zeros[:-1].sum())   # gap zeros are marked only along with real ones
        if not real:
            return wire.build(wire.Header(self.codec, n, n_scales=n_scales), scales=scales,
                              body=bits)
        z = real + int(zeros[-1])
        h = wire.Header(self.codec, n, n_scales=n_scales, nnz=z, flags=wire.FLAG_ZEROS)
        bits, marks = _marks_from_plane(plane, bits, z, n)
        return wire.build(h, scales=scales, body=bits, zeros=marks)

    def encode(self, x, layout: Layout, scales: torch.Tensor, flags: int = 0,
               zeros: int | None = None) -> torch.Tensor:
        n_scales = len(layout.sizes)
        if flags & wire.FLAG_NONFINITE:     # x may be None: nothing of it is sent
            h = wire.Header(self.codec, layout.numel, n_scales=n_scales, flags=flags)
            return wire.build(h, scales=torch.zeros(h.n_scales))
        z = count_zeros(x, layout) if zeros is None else zeros
        return _encode_signs(self.codec, x, z, lambda: kernels.pack_signs(x), n_scales, scales)

    def decode(self, payload: wire.Payload, layout: Layout) -> torch.Tensor:
        """One rank's message as floats: scale_t * sign, tensor by tensor (0 where marked)."""
        out = torch.zeros(layout.numel)
        if payload.header.zero_form() == "all":
            return out
        signs = kernels.unpack_signs(payload.body, layout.numel)
        _apply_zeros(payload, signs)
        for (o, s), sc in zip(layout.segments(), payload.scales.tolist()):
            out[o:o + s] = signs[o:o + s] * sc
        return out

    def aggregate(self, payloads, layout: Layout, out=None) -> torch.Tensor:
        """Mean over ranks of scale_{m,t} * sign_m, tensor by tensor, from the packed bits
        (a marked zero adds nothing; see Sign.aggregate).
        out: a float32 buffer of layout.numel whose gap elements are 0 (else a new one)."""
        scales = torch.stack([p.scales for p in payloads])  # (n_ranks, n_tensors)
        if out is None:
            out = torch.zeros(layout.numel, dtype=torch.float32)
        n_ranks = len(payloads)
        if _has_zeros(payloads):
            keep, rows, planes = _voters_with_zeros(payloads, layout.numel)
            if rows is None:
                return out.zero_()
            return kernels.scaled_vote(rows, segment_pairs(layout), (scales[keep] / n_ranks).T,
                                       out, zeros=planes)
        return kernels.scaled_vote(_gathered_rows(payloads), segment_pairs(layout),
                                   (scales / n_ranks).T, out)


class Dense:
    """Values as they are (fp32) or halved (fp16); travels by allreduce, not allgather."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.codec = "fp16" if dtype == torch.float16 else "fp32"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) if x.dtype != self.dtype else x.clone()

    def decode(self, reduced: torch.Tensor) -> torch.Tensor:
        return reduced.to(torch.float32)


# --- sparse codecs (issue 5) --------------------------------------------------------------------

FP16_MAX = 65504.0


class Sparse:
    """(index, value) pairs: nnz int32 indices, then nnz float32 ("sparse32", 64 bits per sent
    coordinate) or float16 ("sparse16", 48 bits) values. With FLAG_DENSE the body is instead
    every coordinate as float32 (a sender for which the pairs would cost more than the dense
    vector). The encoder's contract: indices ascending and unique within a payload.

    The aggregate is the sum over ranks of each rank's pairs, added in rank order with one
    `index_add_` per rank. Indices are unique inside one call, so every coordinate sees the
    same float additions in the same order on every rank: the result is bit-identical
    everywhere. A rank with nnz = 0 is an ordinary 16-byte payload that adds nothing.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"sparse values travel as float32 or float16, not {dtype}")
        self.dtype = dtype
        self.codec = "sparse16" if dtype == torch.float16 else "sparse32"

    def quantize(self, values: torch.Tensor) -> torch.Tensor:
        """The values as every rank will receive them (float32). float16 clamps to its range,
        so what does not fit stays in the sender's error memory instead of becoming Inf."""
        if self.dtype == torch.float32:
            return values
        return values.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)

    def encode(self, idx: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
        h = wire.Header(self.codec, n, nnz=idx.numel())
        body = torch.cat([idx.to(torch.int32).view(torch.uint8),
                          values.to(self.dtype).view(torch.uint8)])
        return wire.build(h, body=body)

    def encode_pairs(self, nnz: int, n: int):
        """A payload of nnz pairs for a kernel to fill (kernels.topk_take, threshold_take):
        (payload, idx, vals) with idx the int32 and vals the value (self.dtype) views of its
        body. Filled with ascending indices, its bytes are those of encode(idx, vals, n)."""
        payload, body = wire.allocate(wire.Header(self.codec, n, nnz=nnz))
        return payload, body[:4 * nnz].view(torch.int32), body[4 * nnz:].view(self.dtype)

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        return wire.build(wire.Header(self.codec, x.numel(), flags=wire.FLAG_DENSE),
                          body=x.to(torch.float32))

    def encode_nonfinite(self, n: int) -> torch.Tensor:
        return wire.build(wire.Header(self.codec, n, flags=wire.FLAG_NONFINITE))

    def decode(self, payload: wire.Payload, bucket: str = "?"):
        """(indices int64, values float32), or (None, dense float32 vector) for FLAG_DENSE."""
        h = payload.header
        if h.flags & wire.FLAG_DENSE:
            return None, payload.body.view(torch.float32)
        idx = payload.body[:4 * h.nnz].view(torch.int32)
        vals = payload.body[4 * h.nnz:].view(self.dtype)
        if h.nnz and (int(idx.min()) < 0 or int(idx.max()) >= h.n):
            raise wire.PayloadError(f"payload from rank {payload.rank} for bucket {bucket} has "
                                    f"indices outside [0, {h.n})")
        return idx, vals

    def aggregate(self, payloads, n: int, bucket: str = "?", out=None,
                  divisor: int = 1) -> torch.Tensor:
        """Sum over ranks (rank order) of every rank's pairs as a dense float32 vector
        (written into out when given), divided by divisor, in one kernels.sparse_sum call: the
        same float32 additions in the same order as zeros + index_add_ / add_ rank by rank,
        then div_. Every rank's indices are checked before anything is written
        (PayloadError)."""
        parts = []
        for p in payloads:
            h = p.header
            if h.flags & wire.FLAG_DENSE:
                parts.append((None, p.body.view(torch.float32)))
            else:
                parts.append((p.body[:4 * h.nnz].view(torch.int32),
                              p.body[4 * h.nnz:].view(self.dtype)))
        try:
            return kernels.sparse_sum(parts, n, out=out, divisor=divisor)
        except kernels.SparseIndexError as exc:
            raise wire.PayloadError(f"payload from rank {payloads[exc.part].rank} for bucket "
                                    f"{bucket} has indices outside [0, {n})") from None
