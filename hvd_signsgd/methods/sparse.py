"""Sparsifiers with error feedback: Top-k, hard threshold, Random-k (ALGORITHMS.md sections 5, 8).

All three keep the error-feedback memory of base.py (ErrorFeedback, one component for every
compressor that needs one), in gradient units:

    p = e + g (+ noise, perturb.py);   q = C(p);   e <- p - q;   send q

so sum_t q_t + e_T = sum_t g_t on every rank (the conservation invariant; exact for float32
values, the float16 option leaves its rounding residual in e). The learning rate and momentum
of the wrapped optimizer act after aggregation (Sahu et al.'s DNN code, GRACE).

Exchange. topk and threshold send (int32 index, value) pairs (codecs.Sparse) in one allgather
per bucket per step, which Horovod runs as an allgatherv: each rank's payload has its own length,
parsed back from its header (wire.split). A rank with nothing to send sends a 16-byte header;
there is no special path. The aggregate is the scatter-add of every rank's pairs in rank order,
divided by n: bit-identical on every rank. randomk needs no indices on the wire: every rank
draws the same ones from (seed, step, bucket), and the k values go through a float32 allreduce.

Byte counts: for threshold, whose payload length varies by rank and step, compression_stats also
counts the size exchange an allgatherv needs: one int64 per rank (Horovod's first-dimension size
in its negotiation), 8 bytes sent and 8 (n - 1) received per bucket per step. topk payloads have
a length fixed by the layout, identical on every rank and step (an allgather), so none is
counted. Per step the methods also report, summed into compression_stats: nnz_sent (pairs or
values sent), dense_fallbacks (threshold) and error_resets (perturb.py).
"""
from __future__ import annotations

import math

import torch

from .. import kernels
from ..codecs import Sparse
from .base import (
    FAILED_SLOT,
    NONFINITE_SLOT,
    ErrorFeedbackMethod,
    NonFiniteGradientError,
    as_mean,
    check_status_slots,
    mean_divisor,
    mix_seed,
)
from .perturb import Perturbation

# --- Top-k selection ------------------------------------------------------------------------------

# Above this many elements (and for k large enough for a sample to estimate its threshold),
# topk_indices first keeps the candidates above a sampled threshold and selects among them;
# examples/bench_topk.py measures the two paths.
SAMPLED_MIN_NUMEL = 1 << 17
_SAMPLE_PER_K = 64       # sample size m = _SAMPLE_PER_K * d / k: about 64 sample points above
_SAMPLE_Z = 4.0          # the true k-th value; the threshold sits z standard deviations lower


def _exact_from(a: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (ascending) of the k largest entries of a; ties at the k-th value go to the
    lowest positions."""
    if 64 * k <= a.numel():       # the k-th largest value: torch.topk keeps a small heap here,
        kth = torch.topk(a, k, sorted=False).values.min()
    else:                         # and kthvalue's quickselect is faster for larger k
        kth = torch.kthvalue(a, a.numel() - k + 1).values
    idx = (a >= kth).nonzero().squeeze(1)
    if idx.numel() == k:          # no ties across the cut (the usual case)
        return idx
    gt = a > kth
    eq = a == kth
    need = k - int(gt.sum())
    keep = gt | (eq & (eq.cumsum(0) <= need))
    return keep.nonzero().squeeze(1)


def _sampled_threshold(a: torch.Tensor, k: int) -> float | None:
    """A value below the k-th largest of a with high probability, from a fixed random sample;
    None where a sample would not be much smaller than a."""
    d = a.numel()
    m = _SAMPLE_PER_K * d // k
    if m * 8 > d:
        return None
    gen = torch.Generator().manual_seed(d)    # fixed: the selection must not depend on state
    sample = a[torch.randint(d, (m,), generator=gen)]
    ks = m * k / d                            # sample points expected above the k-th value
    r = min(m, int(ks + _SAMPLE_Z * math.sqrt(ks)) + 1)
    return float(torch.topk(sample, r, sorted=False).values.min())


def topk_indices(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries of the 1-D tensor a (pass |p|), as int64 positions in ascending
    order; ties at the cut go to the lowest positions (the same set as a stable descending
    sort). Exactly this set whichever path runs: on large tensors a threshold estimated from a
    sample keeps a candidate set slightly larger than k, and the exact selection runs on the
    candidates only; if the estimate keeps fewer than k, the full tensor is used."""
    d = a.numel()
    if k >= d:
        return torch.arange(d)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    if d >= SAMPLED_MIN_NUMEL:
        t = _sampled_threshold(a, k)
        if t is not None:
            cand = (a >= t).nonzero().squeeze(1)
            if cand.numel() >= k:
                return cand[_exact_from(a[cand], k)]
    return _exact_from(a, k)


# --- the EF family --------------------------------------------------------------------------------

def _per_tensor_k(ratio, k, size):
    return min(size, math.ceil(ratio * size) if k is None else k)


class _SparseEF(Perturbation, ErrorFeedbackMethod):
    """Shared by topk and threshold: pairs over an allgather, with the error-feedback memory
    and perturbation."""
    bits_per_coordinate = 64.0     # per SENT coordinate: int32 index + float32 value

    def __init__(self, values="fp32", noise=0.0, noise_seed="rank", reset_every=0):
        if values not in ("fp32", "fp16"):
            raise ValueError(f"values must be 'fp32' or 'fp16', not {values!r}")
        self.values = values
        self.codec = Sparse(torch.float16 if values == "fp16" else torch.float32)
        if values == "fp16":
            self.bits_per_coordinate = 48.0
        self._init_perturbation(noise, noise_seed, reset_every)
        # Without perturbation, p = g + e is written out of place by a native pass with the
        # NaN/Inf check in it (kernels.add_finite; Top-k's inside its selection,
        # topk_take_sum): the engine keeps no backup of e and makes no check of its own.
        # Perturbation needs the unfused path (perturb.py).
        self.fused = not self.noise and not self.reset_every

    def take(self, p: torch.Tensor, ctx):
        """The pairs payload for p, with e <- p - q applied to the sent positions in the same
        pass (kernels.topk_take / threshold_take); None for threshold's dense fallback."""
        raise NotImplementedError

    def encode_nonfinite(self, ctx):
        return self.codec.encode_nonfinite(ctx.layout.numel)

    def compress_whole(self, p, ctx):
        return self.codec.encode_dense(p)

    def compress(self, p, ctx):
        msg = self.take(p, ctx)                          # e <- p - q (0 for float32 values)
        if msg is None:                                  # threshold's dense fallback
            ctx.stats["dense_fallbacks"] = 1
            ctx.stats["nnz_sent"] = ctx.layout.real_numel
            msg = self.codec.encode_dense(p)
            p.zero_()
        return msg

    def compress_fused(self, g, memories, out, ctx):
        if not kernels.add_finite(g, memories[0], out):
            return None
        return self.compress(out, ctx)

    def aggregate(self, gathered, state, ctx):
        payloads = self._payloads(gathered, ctx, self.codec)
        # the mean in the same call (as_mean's division, block by block with the sums)
        return self.codec.aggregate(payloads, ctx.layout.numel, ctx.bucket, out=ctx.out,
                                    divisor=mean_divisor(ctx))


def _budget(ratio, k):
    """Validate a per-step budget given as a ratio of the coordinates or as a count k."""
    if k is None and not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], not {ratio!r}")
    if k is not None and (int(k) != k or k < 1):
        raise ValueError(f"k must be a positive integer, not {k!r}")
    return float(ratio), None if k is None else int(k)


class TopK(_SparseEF):
    """Top-k with error feedback (Stich et al. 2018 "Mem-SGD"; Aji & Heafield 2017; section 8).

    p = e + g; S = the k largest |p_i|; send (i, p_i) for i in S; e <- p with e_S = 0; the update
    is the mean over ranks of the scatter-added pairs.

    ratio (default 0.01) or k (a count; overrides ratio): per tensor by default
    (scope="layer": k_t = ceil(ratio * d_t), at most d_t), or over the whole bucket
    (scope="bucket": k = ceil(ratio * d_bucket)). Layer-wise is the default because the selected
    set then depends only on the model, not on how the wrapper groups tensors into buckets
    (bucket_cap_mb), and no layer is starved by another layer's larger gradients; Sahu et al.
    use layer-wise Top-k as their main baseline. Payload length is fixed by the layout.

    Selection: exactly the k largest |p_i|, ties broken towards the lowest index (the set of
    topk_indices), by kernels.topk_take: a linear-time radix select per tensor with the EF
    update fused in, one call per bucket (examples/bench_topk.py measures it); without
    perturbation kernels.topk_take_sum, which also forms p = g + e in the selection's pass.
    values="fp16" sends float16 values (48 instead of 64 bits per pair); the rounding residual
    stays in e. noise / noise_seed / reset_every: perturb.py.
    """
    name = "topk"

    def __init__(self, ratio=0.01, k=None, scope="layer", values="fp32", noise=0.0,
                 noise_seed="rank", reset_every=0):
        super().__init__(values, noise, noise_seed, reset_every)
        if scope not in ("layer", "bucket"):
            raise ValueError(f"scope must be 'layer' or 'bucket', not {scope!r}")
        self.ratio, self.k = _budget(ratio, k)
        self.scope = scope
        self._segments = {}

    def options(self):
        size = {"ratio": self.ratio} if self.k is None else {"k": self.k}
        return {**size, "scope": self.scope, "values": self.values,
                **self.perturbation_options()}

    def counts(self, layout) -> list:
        """k per segment (scope="layer") or [k] for the whole bucket."""
        if self.scope == "bucket":
            return [_per_tensor_k(self.ratio, self.k, layout.real_numel)]
        return [_per_tensor_k(self.ratio, self.k, s) for s in layout.sizes]

    def segments(self, layout) -> torch.Tensor:
        """(offset, size, k) per selection range as an int64 (S, 3) tensor: the layout's
        tensors (scope="layer") or the whole flat buffer, gaps included (scope="bucket")."""
        key = (layout, self.scope)
        cached = self._segments.get(key)
        if cached is None:
            if self.scope == "bucket":
                rows = [(0, layout.numel, self.counts(layout)[0])]
            else:
                rows = [(o, s, k) for (o, s), k in zip(layout.segments(), self.counts(layout))]
            cached = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
            self._segments[key] = cached
        return cached

    def take(self, p, ctx):
        segs, msg, idx, vals = self._pairs(ctx)
        kernels.topk_take(p, segs, idx, vals)
        ctx.stats["nnz_sent"] = idx.numel()
        return msg

    def compress_fused(self, g, memories, out, ctx):
        # p = g + e is formed inside the selection: its pass is the candidate scan
        segs, msg, idx, vals = self._pairs(ctx)
        if not kernels.topk_take_sum(g, memories[0], out, segs, idx, vals):
            return None
        ctx.stats["nnz_sent"] = idx.numel()
        return msg

    def _pairs(self, ctx):
        """This step's segments and an empty pairs payload (msg, idx, vals) for them."""
        segs = self.segments(ctx.layout)
        nnz = int(torch.minimum(segs[:, 1], segs[:, 2]).sum()) if segs.numel() else 0
        return (segs, *self.codec.encode_pairs(nnz, ctx.layout.numel))


def threshold_for(k: float) -> float:
    """Sahu et al.'s rule of thumb for the hard threshold: lambda = 1 / (2 sqrt(k)), k the
    number of coordinates one wants to send per step on average."""
    return 1.0 / (2.0 * math.sqrt(k))


class HardThreshold(_SparseEF):
    """Hard-threshold sparsifier with error feedback (Sahu et al., NeurIPS 2021; section 5).

    p = e + g; S = {i : |p_i| >= lam}; send (i, p_i) for i in S; e <- p with e_S = 0. Hence
    max_i |e_i| < lam after every step. The count varies by rank and step (more early, fewer
    late): an allgatherv, whose size exchange is counted (module docstring).

    Choosing lam: it is an absolute value in gradient units, so density depends on the gradient
    scale (loss scaling, layer scale, phase of training). Sahu et al.'s rule of thumb is
    lam = 1 / (2 sqrt(k)) with k the per-step count wanted on average (threshold_for(k); e.g.
    d = 11.2M, k = 0.1% d gives 4.73e-3); then measure the density (compression_stats()'s
    nnz_sent) over a few steps and adjust. Default lam=None applies the rule per bucket with
    k = density * d_bucket (density=0.01): a starting point, not a tuned value.

    Guard: a rank whose |S| exceeds max_density * d (default 1/2, where pairs stop being cheaper
    than the float32 vector) sends p dense instead (FLAG_DENSE) and sets e to 0 for that bucket;
    counted as dense_fallbacks. max_density=1 disables it. values / noise / noise_seed /
    reset_every: as topk.
    """
    name = "threshold"
    variable_size = True

    def __init__(self, lam=None, density=0.01, max_density=0.5, values="fp32", noise=0.0,
                 noise_seed="rank", reset_every=0):
        super().__init__(values, noise, noise_seed, reset_every)
        if lam is not None and not float(lam) > 0.0:
            raise ValueError(f"lam must be > 0, not {lam!r}")
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], not {density!r}")
        if not 0.0 < float(max_density) <= 1.0:
            raise ValueError(f"max_density must be in (0, 1], not {max_density!r}")
        self.lam = None if lam is None else float(lam)
        self.density, self.max_density = float(density), float(max_density)

    def options(self):
        lam = {"lam": self.lam} if self.lam is not None else {"density": self.density}
        return {**lam, "max_density": self.max_density, "values": self.values,
                **self.perturbation_options()}

    def lam_for(self, layout) -> float:
        if self.lam is not None:
            return self.lam
        return threshold_for(max(self.density * layout.real_numel, 1.0))

    def take(self, p, ctx):
        lam = self.lam_for(ctx.layout)
        nnz = kernels.threshold_count(p, lam)             # |p_i| >= lam in float32, as torch
        if nnz > self.max_density * ctx.layout.real_numel:
            return None
        msg, idx, vals = self.codec.encode_pairs(nnz, ctx.layout.numel)
        kernels.threshold_take(p, lam, idx, vals)
        ctx.stats["nnz_sent"] = nnz
        return msg


# --- Random-k -------------------------------------------------------------------------------------

_RANDOMK_STREAM = 0x72616E646B   # "randk"


def _slots(ctx) -> int:
    """Random-k's status slots: one per rank of the exchange (joined ranks included)."""
    return ctx.n_ranks or ctx.size


def sample_without_replacement(d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct positions of range(d), uniformly, ascending. For k <= d/4: draws with
    replacement, kept in draw order until k distinct ones are found (a uniform k-subset,
    O(k log k)); otherwise a permutation prefix (O(d))."""
    if k >= d:
        return torch.arange(d)
    if 4 * k > d:
        return torch.randperm(d, generator=gen)[:k].sort().values
    draws = torch.randint(d, (k + k // 4 + 16,), generator=gen)
    while True:
        vals, order = torch.sort(draws, stable=True)
        first = torch.ones_like(vals, dtype=torch.bool)
        first[1:] = vals[1:] != vals[:-1]
        if int(first.sum()) >= k:
            keep = order[first].sort().values[:k]   # the first k distinct draws
            return draws[keep].sort().values
        draws = torch.cat([draws, torch.randint(d, (k // 4 + 16,), generator=gen)])


class RandomK(Perturbation, ErrorFeedbackMethod):
    """Random-k with error feedback (section 8; the compressor of Avdiukhin & Yaroslavtsev).

    Every rank draws the same k_t = ceil(ratio * d_t) positions per tensor t (or k each) from a
    generator seeded by (seed, step, bucket offset); p = e + g; send p at those positions;
    e <- p with those positions zeroed. Only the values travel: one float32 allreduce of
    sum_t k_t values (4 bytes each) and n status slots; the update puts the mean at the drawn
    positions.

    EF form without the d/k scaling of the unbiased Random-k: error feedback already returns
    what was not sent, and the scaled form would multiply the variance by d/k.

    Status slots: an allreduce carries no per-rank header, so the vector ends with one float32
    per rank of the exchange (4n bytes). A rank whose gradient is not finite (or whose e + g
    overflows), or whose method raised, sends zeros and marks its own slot (base.
    check_status_slots), and every rank raises NonFiniteGradientError or SenderFailedError
    naming it. Finite values whose sum overflows raise NonFiniteGradientError without a name.
    noise / noise_seed / reset_every: perturb.py; on a reset step every rank allreduces its
    whole p (all ranks reset on the same steps).
    """
    name = "randomk"
    collective = "allreduce"
    bits_per_coordinate = 32.0
    reports_failures = True      # through the status slots

    def __init__(self, ratio=0.01, k=None, noise=0.0, noise_seed="rank", reset_every=0):
        self.ratio, self.k = _budget(ratio, k)
        self._init_perturbation(noise, noise_seed, reset_every)

    def options(self):
        size = {"ratio": self.ratio} if self.k is None else {"k": self.k}
        return {**size, **self.perturbation_options()}

    def indices(self, ctx) -> torch.Tensor:
        """The positions every rank sends this step (int64, ascending); identical on all ranks."""
        cached = getattr(ctx, "_randomk_indices", None)
        if cached is not None:
            return cached
        gen = torch.Generator().manual_seed(
            mix_seed(mix_seed(ctx.seed, ctx.offset, ctx.step), 0, _RANDOMK_STREAM))
        idx = torch.cat([o + sample_without_replacement(s, _per_tensor_k(self.ratio, self.k, s),
                                                        gen)
                         for o, s in ctx.layout.segments()])
        ctx._randomk_indices = idx
        return idx

    def n_values(self, ctx) -> int:
        """The values this step sends: sum_t k_t, or every coordinate on a reset step (from
        the layout alone, so that a failed draw still knows the allreduce's length)."""
        if self.reset_due(ctx):
            return ctx.layout.numel
        return sum(_per_tensor_k(self.ratio, self.k, s) for s in ctx.layout.sizes)

    def _message(self, ctx, status: float = 0.0, device=None) -> torch.Tensor:
        """Zeros for this step's values, then the status slots, this rank's set to status."""
        k = self.n_values(ctx)
        msg = torch.zeros(k + _slots(ctx), dtype=torch.float32, device=device)
        msg[k + ctx.rank] = status
        return msg

    def encode_joined(self, g, ctx):
        return self._message(ctx)

    def encode_nonfinite(self, ctx):
        return self._message(ctx, NONFINITE_SLOT)

    def encode_failed(self, ctx):
        return self._message(ctx, FAILED_SLOT)

    def compress_whole(self, p, ctx):
        msg = self._message(ctx, device=p.device)
        msg[:p.numel()] = p
        return self._marked_if_nonfinite(msg, p.numel(), ctx)

    def compress(self, p, ctx):
        idx = self.indices(ctx)
        msg = self._message(ctx, device=p.device)
        msg[:idx.numel()] = p[idx]
        p[idx] = 0.0
        ctx.stats["nnz_sent"] = idx.numel()
        return self._marked_if_nonfinite(msg, idx.numel(), ctx)

    @staticmethod
    def _marked_if_nonfinite(msg, k, ctx):
        # the engine checked g; e + g (+ noise) can still overflow on this rank alone
        if not kernels.all_finite(msg[:k]):
            msg.zero_()
            msg[k + ctx.rank] = NONFINITE_SLOT
        return msg

    def aggregate(self, reduced, state, ctx):
        n = _slots(ctx)
        check_status_slots(reduced[-n:].tolist(), ctx, ", randomk")
        reduced = reduced[:-n]
        if not kernels.all_finite(reduced):
            raise NonFiniteGradientError(
                f"the sum of the ranks' finite randomk values overflowed (bucket {ctx.bucket}, "
                f"step {ctx.step}); the step is not applied on any rank. Lower the learning "
                f"rate, clip gradients, or check the data.")
        vals = as_mean(reduced.to(torch.float32), ctx)
        if self.reset_due(ctx):
            return vals
        out = torch.zeros(ctx.layout.numel) if ctx.out is None else ctx.out.zero_()
        out[self.indices(ctx)] = vals
        return out


__all__ = ["TopK", "HardThreshold", "RandomK", "topk_indices", "threshold_for",
           "sample_without_replacement"]
