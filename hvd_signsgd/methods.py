"""Methods: named recipes over a codec, a per-rank memory and an aggregation rule.

A method sees one bucket at a time (a flat float32 gradient buffer and its Layout) and owns that
bucket's state on this rank. The optimizer wrapper calls

    state = method.init_state(layout)
    method.prepare(g, state, ctx)                # momentum update, where the method has one
    msg = method.encode(g, state, ctx)           # the payload; updates the error memory
    update = method.aggregate(gathered, state, ctx)   # identical on every rank

and writes `update` into p.grad; the wrapped optimizer then applies its learning rate, weight
decay and (where the method has none of its own) momentum. Formulas and their sources are in
ALGORITHMS.md; the section is named in each docstring.

Convention for error feedback: the memory holds gradient units (p = e + g; the learning rate is
applied after aggregation by the wrapped optimizer), as in the DNN code of Sahu et al. and GRACE.
For a constant learning rate this is the same as p = e + lr * g.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import wire
from .codecs import Dense, Layout, ScaledSign, Sign, StochasticSign


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
    aggregation = "mean"

    def init_state(self, layout: Layout) -> dict:
        return {}

    def prepare(self, g: torch.Tensor, state: dict, ctx: StepContext) -> None:
        """State updates that come before the payload (momentum). For model_scope methods the
        wrapper calls prepare on every bucket, then model_norm_sq, then encode."""

    def encode(self, g: torch.Tensor, state: dict, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, gathered: torch.Tensor, state: dict, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def model_norm_sq(self, g: torch.Tensor, state: dict, ctx: StepContext) -> float:
        """For model_scope methods: this bucket's share of the squared whole-model norm,
        computed after any state update the encode step depends on."""
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


# --- baselines ---------------------------------------------------------------------------------

class NoCompression(Method):
    """`none`: float32 allreduce, exactly Horovod's default path."""
    name, collective, bits_per_coordinate = "none", "allreduce", 32.0

    def __init__(self, dtype=torch.float32):
        self.codec = Dense(dtype)

    def encode(self, g, state, ctx):
        return self.codec.encode(g)

    def aggregate(self, reduced, state, ctx):
        out = self.codec.decode(reduced)
        return out.div_(ctx.size) if ctx.average else out


class FP16(NoCompression):
    """`fp16`: float16 allreduce (as hvd.Compression.fp16); 16 bits per coordinate."""
    name, bits_per_coordinate = "fp16", 16.0

    def __init__(self):
        super().__init__(torch.float16)

    def encode(self, g, state, ctx):
        # Average before the sum, as hvd.Compression.fp16 users expect no fp16 overflow.
        return (g / ctx.size if ctx.average else g).to(torch.float16)

    def aggregate(self, reduced, state, ctx):
        return reduced.to(torch.float32)


# --- sign family (ALGORITHMS.md sections 1-4) ---------------------------------------------------

_SIGN = Sign()


def _sign_aggregate(method, gathered, ctx, weights=None):
    payloads = method._payloads(gathered, ctx, method.codec)
    mode = method.aggregation
    if mode == "norm_weighted":
        # E[norm_m * s~(v_m)] = v_m, so this mean is unbiased for the average momentum.
        weights = torch.stack([p.scales[0] for p in payloads]) / ctx.size
        return method.codec.aggregate(payloads, ctx.layout.numel, "sum", weights=weights)
    out = method.codec.aggregate(payloads, ctx.layout.numel, mode, weights=weights)
    if mode == "mean" and not ctx.average:
        out.mul_(ctx.size)
    return out


class SignSGD(Method):
    """signSGD with majority vote (Bernstein et al. 2018/2019; section 1-2).

    Each rank sends sign(g), 1 bit per coordinate; every rank computes the vote
    sign(sum of signs) from the packed bits (ties give 0) and hands it to the wrapped optimizer
    as the gradient, so SGD(lr, weight_decay) applies x <- x - lr * (vote + wd * x): decoupled
    weight decay after the vote. aggregation="mean" averages the signs instead.
    """
    name, bits_per_coordinate = "signsgd", 1.0
    codec = _SIGN

    def __init__(self, aggregation: str = "majority"):
        if aggregation not in ("majority", "mean"):
            raise ValueError(f"aggregation must be 'majority' or 'mean', not {aggregation!r}")
        self.aggregation = aggregation

    def options(self):
        return {"aggregation": self.aggregation}

    def encode(self, g, state, ctx):
        return self.codec.encode(g, flags=wire.FLAG_NONFINITE if ctx.nonfinite else 0)

    def aggregate(self, gathered, state, ctx):
        return _sign_aggregate(self, gathered, ctx)


class Signum(SignSGD):
    """Signum: momentum on each rank, then the sign of the momentum, majority vote (section 1).

    v <- beta * v + (1 - beta) * g; send sign(v). Wrap a plain SGD (no momentum of its own).
    """
    name = "signum"

    def __init__(self, beta: float = 0.9, aggregation: str = "majority"):
        super().__init__(aggregation)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), not {beta}")
        self.beta = beta

    def options(self):
        return {"beta": self.beta, "aggregation": self.aggregation}

    def init_state(self, layout):
        return {"momentum": torch.zeros(layout.numel)}

    def prepare(self, g, state, ctx):
        if not ctx.nonfinite:
            state["momentum"].mul_(self.beta).add_(g, alpha=1.0 - self.beta)

    def encode(self, g, state, ctx):
        return self.codec.encode(state["momentum"],
                                 flags=wire.FLAG_NONFINITE if ctx.nonfinite else 0)


class StochasticSignMethod(SignSGD):
    """Stochastic sign (Safaryan & Richtarik, section 3.3): +1 with probability
    1/2 + g_i / (2 ||g||_2), so E[s] = g / ||g||_2. The norm is over the whole compressed model
    (norm="model", the paper's operator) or per bucket (norm="bucket", a different operator that
    lets buckets leave before the whole backward pass ends)."""
    name = "stochastic_sign"
    codec = StochasticSign()

    def __init__(self, aggregation: str = "majority", norm: str = "model"):
        if aggregation not in ("majority", "mean", "norm_weighted"):
            raise ValueError("aggregation must be 'majority', 'mean' or 'norm_weighted', "
                             f"not {aggregation!r}")
        if norm not in ("model", "bucket"):
            raise ValueError(f"norm must be 'model' or 'bucket', not {norm!r}")
        self.aggregation, self.norm = aggregation, norm
        self.model_scope = norm == "model"

    def options(self):
        return {"aggregation": self.aggregation, "norm": self.norm}

    def _source(self, g, state):
        return g

    def model_norm_sq(self, g, state, ctx):
        return float(self._source(g, state).double().pow(2).sum())

    def encode(self, g, state, ctx):
        x = self._source(g, state)
        norm = ctx.model_norm if self.model_scope else float(x.double().norm())
        flags = wire.FLAG_NONFINITE if ctx.nonfinite else 0
        return self.codec.encode(x, norm=norm, seed=mix_seed(ctx.seed, ctx.rank, ctx.step),
                                 offset=ctx.offset, send_norm=True, flags=flags)


class SSDM(StochasticSignMethod):
    """SSDM, stochastic sign descent with momentum (Safaryan & Richtarik, section 3.5).

    v <- beta_k v + (1 - beta_k) g; send the stochastic sign of v; the update is the MEAN of the
    ranks' signs (values in {-1, -1 + 2/n, ..., 1}), not a vote. beta="schedule" uses
    1 - beta_k = 1/sqrt(k + 1); pair it with `ssdm_lr_lambda` (lr_k = lr_0 / (k + 1)^(3/4)).
    The guarantee is for homogeneous data only (every rank's gradient unbiased for the same
    objective, arXiv 1905.12938v6); on heterogeneous shards sign methods stall (section 3.4).
    aggregation="norm_weighted" also sends each rank's norm and averages norm_m * s_m.
    """
    name = "ssdm"

    def __init__(self, beta=0.9, aggregation: str = "mean", norm: str = "model"):
        super().__init__(aggregation, norm)
        if beta != "schedule" and not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"beta must be in [0, 1) or 'schedule', not {beta!r}")
        self.beta = beta

    def options(self):
        return {"beta": self.beta, "aggregation": self.aggregation, "norm": self.norm}

    def init_state(self, layout):
        return {"momentum": torch.zeros(layout.numel)}

    def beta_at(self, step: int) -> float:
        return 1.0 - 1.0 / math.sqrt(step + 1) if self.beta == "schedule" else float(self.beta)

    def prepare(self, g, state, ctx):
        if not ctx.nonfinite:
            b = self.beta_at(ctx.step)
            state["momentum"].mul_(b).add_(g, alpha=1.0 - b)

    def _source(self, g, state):
        return state["momentum"]


def ssdm_lr_lambda(step: int) -> float:
    """The SSDM step-size schedule factor (k + 1)^(-3/4), for torch.optim.lr_scheduler.LambdaLR."""
    return (step + 1) ** -0.75


class EFSignSGD(Method):
    """EF-signSGD (Karimireddy et al. 2019, section 4): scaled sign with error feedback.

    p = e + g; q = (||p_t||_1 / d_t) sign(p) per tensor t; e <- p - q; the update is the mean
    over ranks of q (a mean, not a vote). 1 bit per coordinate + one float32 per tensor.
    """
    name, bits_per_coordinate = "ef_signsgd", 1.0
    codec = ScaledSign()

    def init_state(self, layout):
        return {"error": torch.zeros(layout.numel)}

    def encode(self, g, state, ctx):
        if ctx.nonfinite:
            return self.codec.encode(g, ctx.layout, None, flags=wire.FLAG_NONFINITE)
        p = state["error"].add_(g)                      # p = e + g, in place
        scales = self.codec.scales(p, ctx.layout)
        msg = self.codec.encode(p, ctx.layout, scales)
        p.sub_(self.codec.decompress_local(p, scales, ctx.layout))   # e <- p - q
        return msg

    def aggregate(self, gathered, state, ctx):
        payloads = self._payloads(gathered, ctx, self.codec)
        out = self.codec.aggregate(payloads, ctx.layout)
        return out if ctx.average else out.mul_(ctx.size)


# --- registry ----------------------------------------------------------------------------------

METHODS = {
    "none": NoCompression,
    "fp16": FP16,
    "signsgd": SignSGD,
    "signum": Signum,
    "stochastic_sign": StochasticSignMethod,
    "ssdm": SSDM,
    "ef_signsgd": EFSignSGD,
}


def make_method(name, **options) -> Method:
    """Build a method by name; unknown names and options raise ValueError listing what exists."""
    if isinstance(name, Method):
        if options:
            raise ValueError("options can only be given with a method name, not an instance")
        return name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for method {name!r}: {e}") from None

