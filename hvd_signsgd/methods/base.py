"""Methods: named recipes over a codec, a per-rank memory and an aggregation rule.

A method sees one bucket at a time (a flat float32 gradient buffer and its Layout) and owns that
bucket's state on this rank. The optimizer wrapper calls

    state = method.init_state(layout)
    method.prepare(g, state, ctx)                # momentum update, where the method has one
    msg = method.encode(g, state, ctx)           # the payload; updates the error memory
    update = method.aggregate(gathered, state, ctx)   # identical on every rank

and writes `update` into p.grad (nothing to write when it is ctx.out, the bucket itself); the
wrapped optimizer then applies its learning rate, weight decay and (where the method has none of
its own) momentum. Formulas and their sources are in ALGORITHMS.md; the section is named in each
docstring.

Convention for error feedback: the memory holds gradient units (p = e + g; the learning rate is
applied after aggregation by the wrapped optimizer), as in the DNN code of Sahu et al. and GRACE.
For a constant learning rate this is the same as p = e + lr * g.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import wire
from ..codecs import Layout


class NonFiniteGradientError(FloatingPointError):
    """A rank's gradient held NaN or Inf; raised on every rank, before anything is applied."""


@dataclass
class StepContext:
    step: int                 # optimizer steps taken before this one
    rank: int
    size: int
    bucket: str               # bucket name, for messages
    offset: int               # the bucket's first element in the whole model (RNG stream position)
    layout: Layout
    seed: int = 0
    average: bool = True      # Horovod op: Average (True) or Sum (False)
    nonfinite: bool = False   # this rank's gradient for the bucket is not finite
    model_norm: float = 0.0   # filled in for methods with model_scope
    out: torch.Tensor = None  # optional float32 buffer of layout.numel, gap elements 0, that
                              # aggregate may fill and return instead of allocating (the wrapper
                              # passes the bucket, whose views are the parameters' .grad)
    stats: dict = field(default_factory=dict)   # per-step counts the method reports
                                                # (summed into compression_stats)


def check_flags(payloads, ctx: StepContext) -> None:
    bad = [p.rank for p in payloads if p.header.flags & wire.FLAG_NONFINITE]
    if bad:
        raise NonFiniteGradientError(
            f"NaN or Inf in the gradient of rank(s) {bad} (bucket {ctx.bucket}, step "
            f"{ctx.step}); the step is not applied on any rank. Lower the learning rate, clip "
            f"gradients, or check the data.")


def mix_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit stream id from (global seed, rank, step); SplitMix-style mixing."""
    z = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB)
    z &= (1 << 64) - 1
    z = ((z ^ (z >> 31)) * 0xD6E8FEEB86659FD9) & ((1 << 64) - 1)
    return (z ^ (z >> 29)) & ((1 << 63) - 1)


class Method:
    name = "?"
    collective = "allgather"          # or "allreduce"
    model_scope = False               # encode needs every bucket at once (a whole-model norm)
    bits_per_coordinate = 32.0
    variable_size = False             # payload length varies by rank/step (allgatherv)
    aggregation = "mean"

    def init_state(self, layout: Layout) -> dict:
        return {}

    def prepare(self, g: torch.Tensor, state: dict, ctx: StepContext) -> None:
        """State updates that come before the payload (momentum). For model_scope methods the
        wrapper calls prepare on every bucket, then norm_part, then encode."""

    def encode(self, g: torch.Tensor, state: dict, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, gathered: torch.Tensor, state: dict, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def norm_part(self, g: torch.Tensor, state: dict, ctx: StepContext) -> float:
        """For model_scope methods: this bucket's share of the whole-model norm (after
        prepare); combine_norms turns the shares of all buckets into the norm."""
        raise NotImplementedError

    def combine_norms(self, parts) -> float:
        raise NotImplementedError

    def options(self) -> dict:
        return {}

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({opts})"

    def _payloads(self, gathered, ctx, codec):
        payloads = wire.split(gathered, ctx.size, bucket=ctx.bucket, codec=codec.codec,
                              n=ctx.layout.numel)
        check_flags(payloads, ctx)
        return payloads
