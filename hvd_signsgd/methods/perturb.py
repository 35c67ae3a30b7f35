"""Perturbed compressed SGD (Avdiukhin & Yaroslavtsev, NeurIPS 2021; ALGORITHMS.md section 6).

A mixin for error-feedback methods: Gaussian noise added to the gradient before compression, so
that compressed SGD leaves strict saddle points, and a periodic reset of the error memory.

    p = e + g + zeta,  zeta ~ N(0, (r^2 / d) I)      (every step, d = the bucket's coordinates)
    every reset_every steps: send p dense once, e <- 0

- Units: like the error memory, the noise is in gradient units (the wrapped optimizer applies
  the learning rate after aggregation), so the parameters move by lr * zeta: the p = e + eta * g_hat
  of the paper with eta = lr.
- noise_seed="rank" (default; experiment 8 "each rank adds its own noise"): rank m draws from
  (seed, rank, step, bucket), so the averaged update carries noise of variance r^2 / (n d).
  noise_seed="shared": every rank draws the same zeta from (seed, step, bucket); the mean
  carries it once, variance r^2 / d, as in single-node perturbed SGD.
- The reset sends the error instead of dropping it (the paper leaves this open; ALGORITHMS.md
  section 10): on a reset step every rank sends its whole p dense and sets e to 0, so
  sum_t q_t + e_T = sum_t (g_t + zeta_t) still holds. All ranks reset on the same steps
  ((step + 1) % reset_every == 0), so the exchange stays the same shape on every rank.

Defaults: noise=0 and reset_every=0 (off): the plain EF method. Used by topk, threshold and
randomk (hvd_signsgd/methods/sparse.py); noise has no effect on a rank whose gradient is
non-finite (that step is refused on every rank anyway).
"""
from __future__ import annotations

import math

import torch

from .base import StepContext, mix_seed

_NOISE_STREAM = 0x6E6F697365   # "noise": keeps these streams apart from other seeded draws
_SHARED = -1                   # the "rank" of the stream every rank shares


class Perturbation:
    noise = 0.0
    noise_seed = "rank"
    reset_every = 0

    def _init_perturbation(self, noise=0.0, noise_seed="rank", reset_every=0):
        if not float(noise) >= 0.0:
            raise ValueError(f"noise (the radius r) must be >= 0, not {noise!r}")
        if noise_seed not in ("rank", "shared"):
            raise ValueError(f"noise_seed must be 'rank' or 'shared', not {noise_seed!r}")
        if int(reset_every) != reset_every or reset_every < 0:
            raise ValueError(f"reset_every must be an integer >= 0, not {reset_every!r}")
        self.noise, self.noise_seed, self.reset_every = float(noise), noise_seed, int(reset_every)

    def perturbation_options(self) -> dict:
        if not self.noise and not self.reset_every:
            return {}
        return {"noise": self.noise, "noise_seed": self.noise_seed,
                "reset_every": self.reset_every}

    def noise_generator(self, ctx: StepContext) -> torch.Generator:
        who = ctx.rank if self.noise_seed == "rank" else _SHARED
        return torch.Generator().manual_seed(
            mix_seed(mix_seed(ctx.seed, who, ctx.step), ctx.offset, _NOISE_STREAM))

    def add_noise(self, p: torch.Tensor, ctx: StepContext) -> None:
        """p += zeta, tensor by tensor (the layout's gap elements stay 0)."""
        if not self.noise:
            return
        gen = self.noise_generator(ctx)
        std = self.noise / math.sqrt(max(ctx.layout.real_numel, 1))
        for o, s in ctx.layout.segments():
            p[o:o + s].add_(torch.randn(s, generator=gen), alpha=std)

    def reset_due(self, ctx: StepContext) -> bool:
        return bool(self.reset_every) and (ctx.step + 1) % self.reset_every == 0

    # the ErrorFeedbackMethod hooks
    def perturb(self, p: torch.Tensor, ctx: StepContext) -> None:
        self.add_noise(p, ctx)

    def send_whole(self, ctx: StepContext) -> bool:
        return self.reset_due(ctx)
