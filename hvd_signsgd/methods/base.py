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
from typing import NamedTuple

import torch

from .. import wire
from ..codecs import Layout, segment_pairs
from ..kernels import ecx_coefficients, ef_residual


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
    check_ranks([p.rank for p in payloads if p.header.flags & wire.FLAG_FAILED],
                [p.rank for p in payloads if p.header.flags & wire.FLAG_NONFINITE], ctx)


def check_ranks(failed: list, bad: list, ctx: StepContext, route: str = "") -> None:
    """Raise for the ranks whose method raised (failed) or whose gradient was not finite."""
    if failed:
        raise wire.SenderFailedError(
            f"the method raised on rank(s) {failed} while encoding bucket {ctx.bucket} at step "
            f"{ctx.step}{route} (see the error there); the step is not applied on any rank")
    if bad:
        raise NonFiniteGradientError(
            f"NaN or Inf in the gradient of rank(s) {bad} (bucket {ctx.bucket}, step "
            f"{ctx.step}{route}); the step is not applied on any rank. Lower the learning rate, "
            f"clip gradients, or check the data.")


NONFINITE_SLOT, FAILED_SLOT = 1.0, 2.0     # a rank's status slot in a dense allreduce


def check_status_slots(status: list, ctx: StepContext, route: str = "") -> None:
    """Raise for the ranks marked in an allreduce's status slots (one float32 per rank of the
    exchange, after the values: a rank whose gradient was not finite or whose method raised
    marks its own and sends zeros). Compared with margins, not ==: Horovod's prescale and
    postscale may leave 2.0000002."""
    check_ranks([m for m, v in enumerate(status) if v > 1.5],
                [m for m, v in enumerate(status) if 0.5 < v <= 1.5], ctx, route)


def mean_divisor(ctx: StepContext) -> int:
    """What a sum over the voting ranks is divided by as Horovod's op asks: the number of
    ranks (op=Average) or 1 (op=Sum)."""
    return ctx.size if ctx.average else 1


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

    @property
    def reports_failures(self) -> bool:
        """Whether encode_failed's payload can tell the other ranks: an allgather's header
        can; an allreduce method must make room for it (Random-k's status slots) and say so.
        Where it cannot, the rank raises at once (the dense baselines)."""
        return self.collective == "allgather"

    def encode_failed(self, ctx: StepContext) -> torch.Tensor:
        """The payload of a rank whose method raised this step (the engine sends it instead):
        every other rank then raises SenderFailedError naming that rank. A FLAG_FAILED header
        for allgather methods."""
        return wire.build(wire.Header(self.codec.codec, ctx.layout.numel,
                                      flags=wire.FLAG_NONFINITE | wire.FLAG_FAILED))

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


class Deferred(NamedTuple):
    """A residual not yet formed (ErrorFeedback.fused_deferred): the buffer holds an earlier
    step's p, and the memory is kernels.ef_residual(p, scales, segments)."""
    scales: torch.Tensor
    segments: torch.Tensor


class MemoryState(dict):
    """A method's state (the dict checkpoints save) plus what they do not save: the spare
    buffer its OutOfPlace keys (the error memories, the momentum) are written into, whether the
    last step swapped it in (and may still be rolled back), and the Deferred residuals of the
    buffers not formed yet (`deferred`, by key; `spare_deferred`, the spare's). Reading a
    deferred key (state[k], get, items, values) forms its residual first, in place, so that
    what is read is always the memory; the one-pass kernels read the raw buffers (`raw`)."""
    __slots__ = ("spare", "pending", "deferred", "spare_deferred")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.spare, self.pending = None, False
        self.deferred, self.spare_deferred = {}, None

    def __getitem__(self, k):
        if k in self.deferred:
            self.settle(k)
        return dict.__getitem__(self, k)

    def __setitem__(self, k, v):
        self.deferred.pop(k, None)      # the new value is the memory itself
        dict.__setitem__(self, k, v)

    def __iter__(self):       # makes dict(state) and {**state} read through __getitem__
        return dict.__iter__(self)

    def get(self, k, default=None):
        return self[k] if k in self else default

    def items(self):
        return [(k, self[k]) for k in self]

    def values(self):
        return [self[k] for k in self]

    def copy(self) -> dict:
        return dict(self.items())

    def __reduce__(self):     # copy, deepcopy, pickle, torch.save: a plain dict of the memory
        return dict, (dict(self.items()),)

    def raw(self, k):
        """state[k] as stored: for a deferred key, an earlier p (its residual not formed)."""
        return dict.__getitem__(self, k)

    def settle(self, k) -> None:
        """Form key k's deferred residual in place (a checkpoint, a test or an unfused step
        reads the memory)."""
        d = self.deferred.pop(k, None)
        if d is not None:
            ef_residual(dict.__getitem__(self, k), d.scales, d.segments)


class OutOfPlace:
    """State buffers (state[k] for k in keys, newest first) that a fused kernel rewrites out
    of place: the kernel reads the old buffers and writes the new newest one into the
    MemoryState's spare. On success the buffers rotate, without a copy: the spare becomes
    keys[0], each buffer moves one key older and the oldest becomes the next spare. A NaN/Inf
    found by the kernel leaves the buffers as they were, and a step that fails on another
    rank rotates them back (`rollback`), so the engine needs no backup copy and no NaN/Inf
    pass of its own. One OutOfPlace per MemoryState (it has one spare): ErrorFeedback's
    memories ("error"; ECX's "delta1", "delta2") and the Signum/SSDM momentum use it."""

    def __init__(self, *keys: str):
        self.keys = keys

    def run(self, state: dict, kernel, raw: bool = False):
        """kernel(olds, out) -> result, or None (NaN/Inf; out unspecified, olds untouched);
        olds: the buffers in keys order (raw: a MemoryState's as stored, a Deferred residual
        not formed). Returns the kernel's result; on success out is the new state[keys[0]],
        whose Deferred record the caller sets (None until then)."""
        olds = tuple(state.raw(k) if raw else state[k] for k in self.keys)
        if not isinstance(state, MemoryState):     # no room for a spare: copy back
            out = torch.empty_like(olds[0])
            result = kernel(olds, out)
            if result is not None:
                for older, newer in zip(olds[:0:-1], olds[-2::-1]):
                    older.copy_(newer)
                olds[0].copy_(out)
            return result
        state.pending, state.spare_deferred = False, None    # the spare is written below
        out = state.spare
        if out is None or out.shape != olds[0].shape or out.device != olds[0].device:
            out = torch.empty_like(olds[0])
        result = kernel(olds, out)
        if result is not None:
            self._rotate(state, (out,) + olds[:-1], olds[-1], 1)
            state.pending = True
        else:
            state.spare = out
        return result

    def _rotate(self, state, buffers, spare, by: int):
        """Set the keys' buffers and the spare; each Deferred record moves with its buffer,
        `by` keys older (1: a run, -1: its rollback)."""
        recs, ring = state.deferred, (*self.keys, None)       # None: the spare
        old = {k: recs.pop(k) for k in self.keys if k in recs}
        old[None] = state.spare_deferred
        moved = {ring[(i + by) % len(ring)]: old.get(k) for i, k in enumerate(ring)}
        for k, v in zip(self.keys, buffers):
            dict.__setitem__(state, k, v)
            if moved[k] is not None:
                recs[k] = moved[k]
        state.spare, state.spare_deferred = spare, moved[None]

    def rollback(self, state: dict) -> None:
        """Undo the last run's rotation (the step failed on some rank)."""
        if isinstance(state, MemoryState) and state.pending:
            bufs = tuple(state.raw(k) for k in self.keys)
            self._rotate(state, bufs[1:] + (state.spare,), bufs[0], -1)
            state.pending = False

    @staticmethod
    def commit(state: dict) -> None:
        if isinstance(state, MemoryState):
            state.pending = False


class ErrorFeedback:
    """The error-feedback memory, one component for every compressor that needs it (GRACE's
    "memory"; ALGORITHMS.md sections 0 and 7):

        p = g + c          compensate(): c from the memory, p written into a memory buffer
        q = C(p)           the compressor sends q and leaves p - q in that buffer
        e_t <- p - q       the new memory

    with the compensation c chosen by `compensation`:

        "single"  c = e_{t-1}                                    plain error feedback
        "ecx"     c = (2 - alpha) e_{t-1} - (1 - alpha) e_{t-2}  ErrorCompensatedX
        "none"    c = 0, no memory (p is a scratch copy of g)

    "single" keeps sum_t q_t + e_T = sum_t g_t on every rank (the conservation invariant),
    "ecx" keeps sum_t q_t + e_T - (1 - alpha) e_{T-1} = sum_t g_t. The memory holds gradient
    units (the learning rate acts after aggregation; see the module docstring). `keys` names
    the state entries, newest first: ("error",) by default, ECX's ("delta1", "delta2"), so
    that checkpoints keep their keys. A compressor gets error feedback by composition: an
    `ErrorFeedbackMethod` whose `compress` writes the residual into p (the fused kernels do it
    in the same pass as the packing or the selection).

    Rounding (ecx): p = g + (a e_{t-1} - b e_{t-2}), a = float32(2 - alpha),
    b = float32(1 - alpha), each operation rounded to float32 in this order: the order of the
    fused kernel kernels.ecx_sign, so that fused and unfused agree bit for bit.

    A fused compressor instead reads g and the memories and writes the new memory into a spare
    buffer (`fused`); the buffers then rotate (e_{t-1} becomes e_{t-2}, the spare e_{t-1}, the
    oldest the next spare) without a copy. A NaN/Inf found by the kernel leaves the memories
    as they were, and a step that fails on another rank rotates them back (`rollback`), so
    the engine needs no backup copy of them.

    Both compensations also have a one-pass form (`fused_deferred`): each buffer keeps the p
    it was made from and the scales of q, and a later step's kernel forms e = p - q as it
    reads it, so the residual costs no pass of its own. The MemoryState forms it in place
    whenever the memory is read.
    """

    def __init__(self, compensation: str = "single", alpha: float = 1.0, keys=None):
        if compensation not in ("single", "ecx", "none"):
            raise ValueError(f"compensation must be 'single', 'ecx' or 'none', not "
                             f"{compensation!r}")
        depth = {"none": 0, "single": 1, "ecx": 2}[compensation]
        keys = tuple(keys) if keys is not None else ("error",)[:depth]
        if len(keys) != depth:
            raise ValueError(f"compensation={compensation!r} keeps {depth} memories, "
                             f"keys={keys!r}")
        self.compensation, self.alpha, self.keys = compensation, float(alpha), keys
        self._buffers = OutOfPlace(*keys)

    def coefficients(self) -> tuple[float, float]:
        """(a, b) of c = a e_{t-1} - b e_{t-2}, rounded to float32 (exact as Python floats)."""
        return ecx_coefficients(self.alpha)

    def init_state(self, layout) -> dict:
        if not self.keys:
            return {}
        return MemoryState({k: torch.zeros(layout.numel) for k in self.keys})

    def compensate(self, g: torch.Tensor, state: dict) -> torch.Tensor:
        """p = g + c, written into a memory buffer that becomes the newest memory: the
        compressor leaves p - q in it. "ecx" writes p over e_{t-2}'s buffer and moves
        e_{t-1} to e_{t-2}'s key; "none" returns a copy of g."""
        if self.compensation == "single":
            return state[self.keys[0]].add_(g)
        if self.compensation == "none":
            return g.clone()
        k1, k2 = self.keys
        d1, d2 = state[k1], state[k2]
        a, b = self.coefficients()
        ad1 = d1 * a
        d2.mul_(b)
        torch.sub(ad1, d2, out=d2)
        d2.add_(g)                          # (a d1 - b d2) + g: the same bits as g + (...)
        state[k1], state[k2] = d2, d1
        return d2

    def fused(self, g: torch.Tensor, state: dict, kernel):
        """kernel(g, memories, out) -> payload, or None (NaN/Inf; out unspecified, g and the
        memories untouched); memories: the state's buffers in `keys` order (newest first).
        Returns the kernel's result; on success out is the newest memory (OutOfPlace)."""
        return self._buffers.run(state, lambda mems, out: kernel(g, mems, out))

    def fused_deferred(self, g: torch.Tensor, state: MemoryState, segments: torch.Tensor,
                       kernel):
        """The one-pass form of `fused`: each memory stays the p it was made from until a
        later step forms its residual inside the kernel, so the residual costs no pass of its
        own. kernel(g, kept, prev_scales, out) -> (payload, scales) or None; kept: the raw
        buffers in `keys` order, prev_scales one tensor per buffer with ef_residual's meaning
        (zeros: the buffer is the memory itself). On success out holds p and becomes the
        newest buffer, Deferred with the returned scales; the older buffers keep their
        records; rollback and NaN/Inf as `fused`. Returns the payload or None."""
        recs = state.deferred
        prev = tuple(recs[k].scales if k in recs
                     else torch.zeros(segments.shape[0], device=g.device) for k in self.keys)
        result = self._buffers.run(state, lambda kept, out: kernel(g, kept, prev, out),
                                   raw=True)
        if result is None:
            return None
        payload, scales = result
        recs[self.keys[0]] = Deferred(scales, segments)
        return payload

    def rollback(self, state: dict) -> None:
        """Undo the last fused step's rotation (the step failed on some rank)."""
        self._buffers.rollback(state)

    @staticmethod
    def commit(state: dict) -> None:
        OutOfPlace.commit(state)


class ErrorFeedbackMethod(Method):
    """A compressor with the ErrorFeedback memory: subclasses give `compress(p, ctx)` (payload;
    leaves p - q in p) and `encode_nonfinite(ctx)`; `perturb(p, ctx)` may add to p first, and
    `send_whole(ctx)` may ask for p to be sent dense this step (perturb.py's reset).

    A subclass with a fused kernel sets `fused = True` and gives `compress_fused(g, memories,
    out, ctx)` (payload of p = g + c, out <- p - q; None on NaN/Inf; memories: the buffers of
    memory.keys, newest first); it then has neither perturb nor send_whole, checks NaN/Inf
    itself and writes its memory out of place (ErrorFeedback). A subclass with another
    compensation (ECX) sets its own `memory`. One whose kernel can also form the residuals
    lazily sets `deferred = True` and gives `compress_deferred(g, kept, prev_scales, out,
    ctx)` ((payload, scales) or None; ErrorFeedback.fused_deferred), used where the state is
    a MemoryState."""
    memory = ErrorFeedback()
    fused = False
    deferred = False

    def init_state(self, layout):
        return self.memory.init_state(layout)

    @property
    def encode_checks_finite(self):
        return self.fused

    @property
    def self_restored_keys(self):
        return self.memory.keys if self.fused else ()

    def rollback(self, state):
        self.memory.rollback(state)

    def commit(self, state):
        self.memory.commit(state)

    def encode(self, g, state, ctx):
        if ctx.nonfinite:          # memory untouched; every rank raises (or skips)
            return self.encode_nonfinite(ctx)
        if self.fused:
            msg = self._encode_fused(g, state, ctx)
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

    def _encode_fused(self, g, state, ctx):
        if self.deferred and isinstance(state, MemoryState):
            return self.memory.fused_deferred(
                g, state, segment_pairs(ctx.layout),
                lambda g, kept, prev, out: self.compress_deferred(g, kept, prev, out, ctx))
        return self.memory.fused(g, state,
                                 lambda g, mems, out: self.compress_fused(g, mems, out, ctx))

    def perturb(self, p, ctx) -> None:
        pass

    def send_whole(self, ctx) -> bool:
        return False

    def compress(self, p, ctx) -> torch.Tensor:
        raise NotImplementedError

    def compress_fused(self, g, memories, out, ctx) -> torch.Tensor | None:
        raise NotImplementedError

    def compress_whole(self, p, ctx) -> torch.Tensor:
        raise NotImplementedError

    def encode_nonfinite(self, ctx) -> torch.Tensor:
        raise NotImplementedError
