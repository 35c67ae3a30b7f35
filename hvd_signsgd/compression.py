"""Horovod-style compressor objects: `hvd_signsgd.Compression.<method>`.

Two ways to use them:

- `hvd_signsgd.DistributedOptimizer(opt, compression=hvd_signsgd.Compression.signum)`: the real
  thing, 1 bit per coordinate over an allgather of packed bits (same as method="signum").
- `hvd.DistributedOptimizer(opt, compression=hvd_signsgd.Compression.signsgd)` (stock Horovod):
  Horovod allreduces what `compress` returns, so only methods whose aggregate is a plain sum
  of per-rank values can work there, and then not at 1 bit: `signsgd` sends its signs as
  float16 (16 bits per coordinate; a zero gradient sends 0, which does not vote) and
  `decompress` takes the sign of the average, which is exactly the majority vote (ties give
  0). A non-finite gradient on any rank sends NaN, so the average is NaN on every rank and
  every rank raises FloatingPointError in `decompress` (never one rank alone, which would
  leave the others waiting). `fp16` and `none` behave as Horovod's own. Methods
  with per-rank state (signum, ssdm, ef_signsgd, ...) raise a TypeError naming
  hvd_signsgd.DistributedOptimizer: Horovod's compressor interface has no per-tensor state.
"""
from __future__ import annotations

import torch

from . import kernels
from .methods import METHODS


class MethodCompressor:
    """Carries a method name (and options) into hvd_signsgd.DistributedOptimizer."""

    def __init__(self, method: str, **options):
        self.method_name, self.options = method, options

    @property
    def method(self):
        from .methods import make_method
        return make_method(self.method_name, **self.options)

    def __call__(self, **options) -> MethodCompressor:
        """Compression.signum(beta=0.95): the same compressor with options."""
        return MethodCompressor(self.method_name, **{**self.options, **options})

    def __repr__(self):
        return f"hvd_signsgd.Compression.{self.method_name}"

    def compress(self, tensor):
        raise TypeError(
            f"{self!r} keeps per-rank state (momentum or error memory) and sends packed bits "
            f"over an allgather, which stock hvd.DistributedOptimizer cannot do. Use "
            f"hvd_signsgd.DistributedOptimizer(optimizer, named_parameters=..., "
            f"compression={self!r}) instead.")

    def decompress(self, tensor, ctx):  # pragma: no cover - compress already raised
        raise TypeError(f"{self!r} cannot run inside stock hvd.DistributedOptimizer")


class SignVoteCompressor(MethodCompressor):
    """signsgd: in stock Horovod, float16 signs (16 bits/coordinate) averaged by the allreduce;
    the sign of that average is the majority vote. sign(0) = 0: an exact zero sends 0 and
    does not vote."""

    def compress(self, tensor):
        signs = torch.sign(tensor)
        if not kernels.all_finite(tensor):    # +-inf has a sign, but must not vote
            signs = signs.masked_fill(~torch.isfinite(tensor), float("nan"))
        return signs.to(torch.float16), tensor.dtype

    def decompress(self, tensor, ctx):
        if not kernels.all_finite(tensor):
            raise FloatingPointError("NaN or Inf in the gradient of at least one rank given "
                                     "to hvd_signsgd.Compression.signsgd; raised on every rank")
        return torch.sign(tensor).to(ctx)


class DenseCompressor(MethodCompressor):
    """fp16 / none: the same as hvd.Compression.fp16 / hvd.Compression.none."""

    def compress(self, tensor):
        if self.method_name == "fp16" and tensor.dtype.is_floating_point:
            return tensor.to(torch.float16), tensor.dtype
        return tensor, None

    def decompress(self, tensor, ctx):
        return tensor.to(ctx) if ctx is not None else tensor


class Compression:
    """One compressor per method, named as the methods are."""


for _name in METHODS:
    _cls = {"signsgd": SignVoteCompressor, "fp16": DenseCompressor,
            "none": DenseCompressor}.get(_name, MethodCompressor)
    setattr(Compression, _name, _cls(_name))
