"""Codecs: stateless translations between a bucket's flat float32 buffer and a wire payload.

A codec knows the bytes and nothing of time: error memory, momentum and schedules live in the
methods (methods.py). Each codec offers
    encode(x, layout, ...) -> uint8 payload (wire.py format)
    aggregate(payloads, layout, ...) -> float32 dense vector of layout.numel
and `aggregate` works straight from the gathered bytes (the vote counts packed bits; it never
materialises one float vector per rank).
"""
from __future__ import annotations

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


class Sign:
    """1 bit per element: the IEEE sign bit (+0 sends +1, -0 sends -1)."""
    codec = "sign"

    def encode(self, x: torch.Tensor, flags: int = 0) -> torch.Tensor:
        h = wire.Header(self.codec, x.numel(), flags=flags)
        return wire.build(h, body=None if flags & wire.FLAG_NONFINITE else kernels.pack_signs(x))

    def decode(self, payload: wire.Payload, n: int) -> torch.Tensor:
        """One rank's message as floats: +1/-1 per element."""
        return kernels.unpack_signs(payload.body, n)

    def aggregate(self, payloads, n: int, mode: str = "majority",
                  weights=None, out=None) -> torch.Tensor:
        """mode "majority": sign of the sum of signs (ties give 0); "mean": the sum divided by
        the number of ranks; weights scale each rank's signs before summing. out: a float32
        buffer of n elements to write into (else a new one)."""
        rows = _gathered_rows(payloads)
        if mode == "majority":
            return kernels.vote(rows, n, mode="majority", weights=weights, out=out)
        out = kernels.vote(rows, n, mode="sum", weights=weights, out=out)
        return out.div_(len(payloads)) if mode == "mean" else out


class StochasticSign(Sign):
    """sign(x_i + norm * u_i), u ~ U[-1, 1]: +1 with probability 1/2 + x_i / (2 norm).

    The random stream depends only on (seed, global element index), so it is independent of
    bucketing. The sender may attach its norm (one float32) for the norm-weighted mean.
    """
    codec = "stochastic_sign"

    def encode(self, x, norm: float, seed: int, offset: int, send_norm: bool = False,
               flags: int = 0) -> torch.Tensor:
        h = wire.Header(self.codec, x.numel(), n_scales=int(send_norm), flags=flags)
        if flags & wire.FLAG_NONFINITE:
            return wire.build(h, scales=torch.zeros(h.n_scales))
        bits = kernels.pack_stochastic_signs(x, norm, seed, offset)
        return wire.build(h, scales=torch.tensor([norm], dtype=torch.float32), body=bits)


class ScaledSign:
    """1 bit per element plus one float32 scale per tensor: scale_t = ||x_t||_1 / d_t
    (Karimireddy et al.'s scaled sign, applied per tensor as in their reference code)."""
    codec = "scaled_sign"

    @staticmethod
    def scales(x: torch.Tensor, layout: Layout) -> torch.Tensor:
        return torch.stack([x[o:o + s].abs().sum() / max(s, 1)
                            for o, s in layout.segments()]).to(torch.float32)

    @staticmethod
    def decompress_local(x: torch.Tensor, scales: torch.Tensor, layout: Layout) -> torch.Tensor:
        """What this rank's payload decodes to (for the error memory): scale_t * sign(x)."""
        q = torch.zeros_like(x)
        for (o, s), sc in zip(layout.segments(), scales.tolist()):
            torch.copysign(torch.tensor(sc), x[o:o + s], out=q[o:o + s])
        return q

    @staticmethod
    def subtract_local(x: torch.Tensor, scales: torch.Tensor, layout: Layout) -> None:
        """x <- x - scale_t * sign(x), in place (the error-feedback residual), one tensor's
        segment at a time so that no bucket-sized temporary is allocated."""
        for (o, s), sc in zip(layout.segments(), scales.tolist()):
            seg = x[o:o + s]
            seg.sub_(torch.copysign(torch.tensor(sc), seg))

    def encode(self, x, layout: Layout, scales: torch.Tensor, flags: int = 0) -> torch.Tensor:
        h = wire.Header(self.codec, x.numel(), n_scales=len(layout.sizes), flags=flags)
        if flags & wire.FLAG_NONFINITE:
            return wire.build(h, scales=torch.zeros(h.n_scales))
        return wire.build(h, scales=scales, body=kernels.pack_signs(x))

    def decode(self, payload: wire.Payload, layout: Layout) -> torch.Tensor:
        """One rank's message as floats: scale_t * sign, tensor by tensor."""
        signs = kernels.unpack_signs(payload.body, layout.numel)
        out = torch.zeros(layout.numel)
        for (o, s), sc in zip(layout.segments(), payload.scales.tolist()):
            out[o:o + s] = signs[o:o + s] * sc
        return out

    def aggregate(self, payloads, layout: Layout, out=None) -> torch.Tensor:
        """Mean over ranks of scale_{m,t} * sign_m, tensor by tensor, from the packed bits.
        out: a float32 buffer of layout.numel whose gap elements are 0 (else a new one)."""
        rows = _gathered_rows(payloads)
        scales = torch.stack([p.scales for p in payloads])  # (n_ranks, n_tensors)
        if out is None:
            out = torch.zeros(layout.numel, dtype=torch.float32)
        n_ranks = len(payloads)
        for t, (o, s) in enumerate(layout.segments()):
            if s == 0:
                continue
            seg_rows = rows[:, o // 8:(o + s + 7) // 8]
            kernels.vote(seg_rows, s, mode="sum", weights=scales[:, t] / n_ranks,
                         out=out[o:o + s])
        return out


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

    def aggregate(self, payloads, n: int, bucket: str = "?", out=None) -> torch.Tensor:
        """Sum over ranks (rank order) of every rank's pairs as a dense float32 vector
        (written into out when given), in one kernels.sparse_sum call: the same float32
        additions in the same order as zeros + index_add_ / add_ rank by rank. Every rank's
        indices are checked before anything is written (PayloadError)."""
        parts = []
        for p in payloads:
            h = p.header
            if h.flags & wire.FLAG_DENSE:
                parts.append((None, p.body.view(torch.float32)))
            else:
                parts.append((p.body[:4 * h.nnz].view(torch.int32),
                              p.body[4 * h.nnz:].view(self.dtype)))
        try:
            return kernels.sparse_sum(parts, n, out=out)
        except kernels.SparseIndexError as exc:
            raise wire.PayloadError(f"payload from rank {payloads[exc.part].rank} for bucket "
                                    f"{bucket} has indices outside [0, {n})") from None
