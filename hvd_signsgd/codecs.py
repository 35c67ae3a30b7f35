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
                  weights=None) -> torch.Tensor:
        """mode "majority": sign of the sum of signs (ties give 0); "mean": the sum divided by
        the number of ranks; weights scale each rank's signs before summing."""
        rows = _gathered_rows(payloads)
        if mode == "majority":
            return kernels.vote(rows, n, mode="majority", weights=weights)
        out = kernels.vote(rows, n, mode="sum", weights=weights)
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
            seg = x[o:o + s]
            q[o:o + s] = torch.where(torch.signbit(seg), -sc, sc)
        return q

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

    def aggregate(self, payloads, layout: Layout) -> torch.Tensor:
        """Mean over ranks of scale_{m,t} * sign_m, tensor by tensor, from the packed bits."""
        rows = _gathered_rows(payloads)
        scales = torch.stack([p.scales for p in payloads])  # (n_ranks, n_tensors)
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
