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
    n_ranks: int = 0          # ranks in the exchange (payloads to split); 0: size
    voters: list = None       # the ranks that vote this step (joined ranks do not); size is
                              # their number, the divisor of every mean
    method_step: int = None   # steps since compression started (step - start_step);
                              # None: step
    found: dict = field(default_factory=dict)   # what a fused prepare found, for norm_part
                                                # and encode of the same bucket and step

    def __post_init__(self):
        if self.method_step is None:
            self.method_step = self.step


def check_flags(payloads, ctx: StepContext) -> None:
    bad = [p.rank for p in payloads if p.header.flags & wire.FLAG_NONFINITE]
    if bad:
        raise NonFiniteGradientError(
            f"NaN or Inf in the gradient of rank(s) {bad} (bucket {ctx.bucket}, step "
            f"{ctx.step}); the step is not applied on any rank. Lower the learning rate, clip "
            f"gradients, or check the data.")


def as_mean(total: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """A sum over the voting ranks as Horovod's op asks: the mean (op=Average) or the sum."""
    return total.div_(ctx.size) if ctx.average else total


def as_sum(mean: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """A mean over the voting ranks as Horovod's op asks: itself (Average) or the sum."""
    return mean if ctx.average else mean.mul_(ctx.size)


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

    unit_scale = False                # the update is +-1 per coordinate (a vote or a mean of
                                      # signs), not in gradient units

    def options(self) -> dict:
        return {}

    def check_optimizer(self, param_groups) -> str | None:
        """A problem with the wrapped optimizer's settings for this method, or None."""
        return None

    def encode_joined(self, g: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The payload of a rank that has joined (optimizer.join()): it votes nothing and
        adds nothing. A header alone for allgather methods; zeros for allreduce methods."""
        return wire.build(wire.Header(self.codec.codec, ctx.layout.numel,
                                      flags=wire.FLAG_JOINED))

    def warmup_rescale(self, update: torch.Tensor, layout: Layout) -> None:
        """During warm-up (start_step) the update is the dense mean gradient. For methods
        whose compressed update is +-1 per coordinate, scale each tensor to a mean |u_i| of 1,
        the size of a vote, so that the learning rate means the same before and after
        compression starts. Methods in gradient units (error feedback) need nothing."""
        if not self.unit_scale:
            return
        for o, s in layout.segments():
            seg = update[o:o + s]
            l1 = float(seg.abs().sum())
            if l1 > 0.0:
                seg.mul_(s / l1)

    # Non-finite steps and the state backup (engine.py). A method whose encode finds NaN/Inf
    # itself (setting ctx.nonfinite) spares the engine its own pass over the gradient; state
    # keys the method can put back itself after a failed step need no backup copy.
    encode_checks_finite = False
    self_restored_keys: tuple = ()

    def rollback(self, state: dict) -> None:
        """Undo what the last encode did to self_restored_keys (a step failed on some rank)."""

    def commit(self, state: dict) -> None:
        """The step that last encoded succeeded on every rank."""

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({opts})"

    def _payloads(self, gathered, ctx, codec):
        """The voting ranks' payloads (joined ranks' are dropped); raises on NaN/Inf flags."""
        payloads = wire.split(gathered, ctx.n_ranks or ctx.size, bucket=ctx.bucket,
                              codec=codec.codec, n=ctx.layout.numel)
        payloads = [p for p in payloads if not p.header.flags & wire.FLAG_JOINED]
        check_flags(payloads, ctx)
        return payloads


class MemoryState(dict):
    """A method's state (the dict checkpoints save) plus what they do not save: the spare
    buffer its OutOfPlace key (the error memory, the momentum) is written into, and whether
    the last step swapped it in (and may still be rolled back)."""
    __slots__ = ("spare", "pending")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.spare, self.pending = None, False


class OutOfPlace:
    """One state buffer (state[key]) that a fused kernel rewrites out of place: the kernel
    reads the old buffer and writes the new one into the MemoryState's spare, which is swapped
    in on success. A NaN/Inf found by the kernel leaves the old buffer as it was, and a step
    that fails on another rank swaps it back (`rollback`), so the engine needs no backup copy
    and no NaN/Inf pass of its own. One such key per MemoryState (it has one spare).
    ErrorFeedback's memory ("error") and the Signum/SSDM momentum ("momentum") use it."""

    def __init__(self, key: str):
        self.key = key

    def run(self, state: dict, kernel):
        """kernel(old, out) -> result, or None (NaN/Inf; out unspecified, old untouched).
        Returns the kernel's result; on success out is the new state[key]."""
        old = state[self.key]
        if not isinstance(state, MemoryState):     # no room for a spare: copy back
            out = torch.empty_like(old)
            result = kernel(old, out)
            if result is not None:
                old.copy_(out)
            return result
        state.pending = False
        out = state.spare
        if out is None or out.shape != old.shape or out.device != old.device:
            out = torch.empty_like(old)
        result = kernel(old, out)
        if result is not None:
            state[self.key], state.spare, state.pending = out, old, True
        else:
            state.spare = out
        return result

    def rollback(self, state: dict) -> None:
        if isinstance(state, MemoryState) and state.pending:
            state[self.key], state.spare, state.pending = state.spare, state[self.key], False

    @staticmethod
    def commit(state: dict) -> None:
        if isinstance(state, MemoryState):
            state.pending = False


_ERROR = OutOfPlace("error")


class ErrorFeedback:
    """The error-feedback memory, one component for every compressor that needs it (GRACE's
    "memory"; ALGORITHMS.md section 0):

        p = e + g          compensate(): in place, so p IS the memory buffer
        q = C(p)           the compressor sends q and leaves p - q in that buffer
        e <- p - q

    so sum_t q_t + e_T = sum_t g_t on every rank (the conservation invariant). The memory holds
    gradient units (the learning rate acts after aggregation; see the module docstring). A
    compressor gets error feedback by composition: an `ErrorFeedbackMethod` whose `compress`
    writes the residual into p (the fused kernels do it in the same pass as the packing or
    the selection).

    A fused compressor instead reads g and e and writes the new memory into a second buffer
    (`fused`), which is swapped in on success: a NaN/Inf found by the kernel leaves e as it
    was, and a step that fails on another rank swaps the old memory back (`rollback`), so
    the engine needs no backup copy of it.
    """

    @staticmethod
    def init_state(layout) -> dict:
        return MemoryState(error=torch.zeros(layout.numel))

    @staticmethod
    def compensate(g: torch.Tensor, state: dict) -> torch.Tensor:
        return state["error"].add_(g)

    @staticmethod
    def fused(g: torch.Tensor, state: dict, kernel):
        """kernel(g, e, e_out) -> payload, or None (NaN/Inf; e_out unspecified, g and e
        untouched). Returns the kernel's result; on success e_out is the new memory."""
        return _ERROR.run(state, lambda e, out: kernel(g, e, out))

    @staticmethod
    def rollback(state: dict) -> None:
        _ERROR.rollback(state)

    @staticmethod
    def commit(state: dict) -> None:
        _ERROR.commit(state)


class ErrorFeedbackMethod(Method):
    """A compressor with the ErrorFeedback memory: subclasses give `compress(p, ctx)` (payload;
    leaves p - q in p) and `encode_nonfinite(ctx)`; `perturb(p, ctx)` may add to p first, and
    `send_whole(ctx)` may ask for p to be sent dense this step (perturb.py's reset).

    A subclass with a fused kernel sets `fused = True` and gives `compress_fused(g, e, e_out,
    ctx)` (payload of p = g + e, e_out <- p - q; None on NaN/Inf); it then has neither perturb
    nor send_whole, checks NaN/Inf itself and writes its memory out of place (ErrorFeedback)."""
    memory = ErrorFeedback()
    fused = False

    def init_state(self, layout):
        return self.memory.init_state(layout)

    @property
    def encode_checks_finite(self):
        return self.fused

    @property
    def self_restored_keys(self):
        return ("error",) if self.fused else ()

    def rollback(self, state):
        self.memory.rollback(state)

    def commit(self, state):
        self.memory.commit(state)

    def encode(self, g, state, ctx):
        if ctx.nonfinite:          # memory untouched; every rank raises (or skips)
            return self.encode_nonfinite(ctx)
        if self.fused:
            msg = self.memory.fused(g, state,
                                    lambda g, e, e_out: self.compress_fused(g, e, e_out, ctx))
            if msg is None:
                ctx.nonfinite = True
                return self.encode_nonfinite(ctx)
            return msg
        p = self.memory.compensate(g, state)
        self.perturb(p, ctx)
        if self.send_whole(ctx):
            ctx.stats["error_resets"] = 1
            ctx.stats["nnz_sent"] = ctx.layout.real_numel
            msg = self.compress_whole(p, ctx)
            p.zero_()
            return msg
        return self.compress(p, ctx)

    def perturb(self, p, ctx) -> None:
        pass

    def send_whole(self, ctx) -> bool:
        return False

    def compress(self, p, ctx) -> torch.Tensor:
        raise NotImplementedError

    def compress_fused(self, g, e, e_out, ctx) -> torch.Tensor | None:
        raise NotImplementedError

    def compress_whole(self, p, ctx) -> torch.Tensor:
        raise NotImplementedError

    def encode_nonfinite(self, ctx) -> torch.Tensor:
        raise NotImplementedError
