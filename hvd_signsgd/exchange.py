"""How a bucket's payloads travel and become its aggregate (ALGORITHMS.md section 11).

The engine asks two things of an `Exchange`, per bucket and step:

    b.handle = exchange.start(b, msg)       # msg: the method's payload (wire.py format)
    update = exchange.aggregate(b, b.handle.wait())

Routes:
  "allreduce"  dense methods (and warm-up): the payload is summed.
  "allgather"  every rank receives every payload and aggregates the whole bucket:
               n-1 payloads in, so the bytes per rank grow with n.
  "alltoall"   the sharded exchange, for methods aggregated by a majority vote or a mean of
               signs (signsgd, signum, stochastic_sign, ssdm with aggregation "majority" or
               "mean"), and for ef_signsgd(double_squeeze=True). The packed bits are cut
               into n contiguous shards (`shard_bounds`); rank m sends shard j to rank j
               (alltoall); rank j aggregates its shard from the n pieces with the vote kernel
               and its result goes to every rank (allgather).
               Bytes per rank, each way, are about (n-1)/n of one payload plus headers.

Piece m -> j (phase 1): a 16-byte wire header (the method's codec, n = the shard's elements,
the sender's NONFINITE / JOINED flag), for scaled sign the sender's per-tensor float32 scales
(n_scales = the bucket's tensors), and the shard's packed bits (zeros when flagged), padded to 4
bytes. Every piece to rank j has the same length, so no sizes are exchanged.

Owner j's result (phase 2), a wire header (codec, n = shard elements, nnz, flags) and:
  majority  the sign plane of the vote (bit set = -1), then the ties (vote 0), which one bit
            cannot carry: none (nnz = 0; with an odd number of voters there are none, and
            with ties="owner" the owner breaks them with its own signs), or
            nnz int32 offsets into the shard, or, with FLAG_DENSE, a tie plane (bit set = 0),
            whichever is smaller. Decoded to exactly the values the allgather vote gives.
  mean      nnz = ceil(log2(n + 1)) bit planes of c, the number of -1 signs per element
            (0..voters): the sum is voters - 2c, exact, and the mean is computed from it with
            the same float32 operations as the allgather path, so it is bit-identical.
  scaled    (double squeeze) n_scales = 1: the float32 scale ||a||_1 / (real elements of the
            shard), then the sign plane of a = mean_m q_m + owner_error; the owner keeps
            owner_error <- a - Q. Alignment gaps of the layout are 0 in Q and in the memory.
  NONFINITE nnz int32 ranks whose gradient was not finite: every rank raises.
  FAILED    the owner could not use the pieces, or its part raised (nnz utf-8 bytes of its
            message): every rank raises PayloadError. An owner always answers, so no rank is
            left waiting.
Planes are padded to 4 bytes. Majority results vary in length with the ties, so their allgather
counts a size exchange (communicator.py); mean and scaled results have a fixed length.

A non-finite rank, or a failing owner, is found before the owner touches its memory, and the
engine restores every bucket's state (owner_error included) on a step that fails.

"hierarchical" (HierarchicalExchange; ALGORITHMS.md section 11): H hosts of L ranks each.
  1. local   the ranks of a host sum their raw float32 bucket (allreduce on the host's
             communicator), scaled by 1/L for op=Average: every local rank holds the host mean.
  2. cross   local rank l takes slice l of the host mean (shard_elements(d, L): contiguous,
             whole 32-element words) as a bucket of its own (the tensors' pieces in it) and
             runs the method on it with the same-local-rank ranks of the other hosts (H
             ranks, route "auto" among H: allgather or the sharded exchange), so a host sends
             one compressed payload of the bucket in all, split over its L ranks.
  3. share   the L slices' updates (float32, a 4-byte status first) are allgathered on the
             host and laid side by side: every rank holds the same whole update.
  The method sees H voters, each the mean of L ranks: a vote is a vote of hosts, an error
  memory or a momentum holds its slice of the host mean and lives on that slice's local rank
  (its checkpoint is that slice; load_section refuses a flat one). Not the flat exchange's
  result, but identical on every rank. A non-finite gradient on any slice is in every rank's
  status words, so every rank raises. Any other failure of a rank's cross step (its wait or
  its aggregate raised) is in its host's status words: every rank of that host raises
  ExchangeError (PayloadError for a malformed payload), the other hosts, whose slice went
  through, apply the step, and the next step's control exchange finds the ranks at different
  steps and raises StepError on every rank; no rank waits forever. Methods with a whole-model
  norm are refused (the norm would be per slice); so is optimizer.join(). Warm-up and
  NoCompression buckets take the flat route.

`choose` picks the route for exchange="auto" from n and the bucket's length with the cost
model of `route_seconds` (constants measured by examples/exchange_crossover.py).

Sparse methods at n ranks (topk, threshold; exchange="auto"). The allgather of (index, value)
pairs grows as the sum of the ranks' payloads P_m, which every rank receives; a ring allreduce
of the bucket as float32 moves 2(n-1)/n * 4d per rank whatever the density. Per rank on the
wire (Counters' model) the allgather costs (n-1)/n * sum_m P_m on average, so a bucket goes
dense when sum_m P_m > 8 d (d: the layout's elements, gaps included): each rank scatters its
own payload (pairs, or threshold's dense fallback) into a zero float32 vector, the vectors
are summed by an allreduce, and the aggregate is that sum divided as the method divides
(ctx.size voters, op=Average). The method's encode ran before, unchanged, so the error memory
is what this rank selected either way. The lengths: topk's follow from the layout (the same
every step; a perturbation reset step sends every coordinate on every rank); threshold's vary,
so their size exchange (8 bytes a rank, counted as before) runs first, by itself, and the
allgather after it counts none. Identical on every rank, but not bit-identical to the
allgather path: the allreduce sums in its own order (float32 rounding). The vector carries n
status slots after the bucket (4n bytes): a rank whose gradient was not finite, or whose
method raised, marks its own slot and sends zeros, so every rank raises naming it.
compression_stats counts such bucket-steps as sparse_dense_buckets. exchange="allgather"
keeps the pairs always.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from . import codecs, kernels, wire
from .codecs import Layout, Sparse
from .methods import NoCompression, NonFiniteGradientError
from .methods.base import FAILED_SLOT, NONFINITE_SLOT, as_mean, check_status_slots
from .methods.sign import EFSignSGD, SignSGD

EXCHANGES = ("auto", "allgather", "alltoall", "hierarchical")
LOCAL_SIZE_ENV = "HVD_SIGNSGD_LOCAL_SIZE"
WORD = wire.WORD
shard_bounds, shard_elements = wire.shard_bounds, wire.shard_elements
_FLAG_FAILED = 1 << 8         # phase 2: the owner could not aggregate its shard
_FLAG_MARKED = 1 << 9         # phase 1: the sender's payload marks exact zeros (sign(0) = 0),
                              # which a shard of sign bits cannot carry; phase 2: so some
                              # sender's did, and every rank falls back to the allgather

# Cost model of a bucket of d elements whose route makes a rank receive B bytes:
#     allgather  t = ALPHA + BETA * B
#     alltoall   t = 2 * ALPHA + BETA * B + GAMMA * d
# ALPHA: one collective's latency (the sharded exchange has two, one after the other); BETA:
# seconds per byte received; GAMMA: the sharded path's extra work per element (its pieces,
# the owner's vote, the result planes), beyond what the allgather path does. Fitted on the
# development machine (2 shared cores, load ~18, Open MPI over shared memory, 3 and 5 ranks,
# buckets of 2^16..2^24 elements) with examples/bench_exchange.py: there allgather was faster
# at every size measured, and the model puts the crossover for large buckets at 7 ranks (odd)
# or 8 (even) for the vote, beyond that for the mean. A network slower than shared memory (a
# larger BETA) moves it down; exchange="alltoall" forces the sharded exchange.
ALPHA = 3.0e-2
BETA = 4.0e-8
GAMMA = 2.0e-8


def count_bits(n_ranks: int) -> int:
    """Bits that carry a count of -1 signs in 0..n_ranks: ceil(log2(n_ranks + 1))."""
    return max(1, math.ceil(math.log2(n_ranks + 1)))


def squeezed(method) -> bool:
    """ef_signsgd(double_squeeze=True): the shard owners compress the mean again."""
    return isinstance(method, EFSignSGD) and method.double_squeeze


def shardable(method) -> bool:
    """The method can travel on the sharded exchange: aggregated by the plain vote or mean of
    signs (no weights, no scales), or the double-squeeze variant of ef_signsgd."""
    return squeezed(method) or (
        isinstance(method, SignSGD) and type(method).aggregate is SignSGD.aggregate
        and method.aggregation in ("majority", "mean"))


def exchange_problem(method, mode: str) -> str | None:
    """A problem with exchange=mode for this method, or None."""
    if mode not in EXCHANGES:
        return f"exchange must be one of {EXCHANGES}, not {mode!r}"
    if mode == "allgather" and method is not None and squeezed(method):
        return (f"{method.describe()} compresses on the shard owners of the sharded exchange; "
                f"use exchange='alltoall' or 'auto'")
    if mode == "hierarchical" and method is not None and method.model_scope:
        return (f"exchange='hierarchical' compresses each host's slice of a bucket on its own "
                f"rank, so a whole-model norm is not available; {method.describe()} needs one "
                f"(use norm='tensor' or another exchange)")
    if mode == "alltoall" and method is not None and not shardable(method):
        return (f"exchange='alltoall' needs a method aggregated by a majority vote or a mean "
                f"of signs (signsgd, signum, stochastic_sign, ssdm with aggregation "
                f"'majority' or 'mean', or ef_signsgd(double_squeeze=True)); "
                f"{method.describe()} is not. Use exchange='auto'.")
    return None


def _r4(x: int) -> int:
    return (x + 3) // 4 * 4


def route_bytes(method, numel: int, n: int, route: str) -> int:
    """Bytes one rank receives for a bucket of numel elements among n ranks, averaged over the
    ranks (no joined ranks; for majority with an even n a tie plane on every shard, the worst
    case; size exchanges left out)."""
    if route == "allgather":
        return (n - 1) * wire.payload_nbytes(method.codec.codec, numel,
                                             n_scales=_n_scales(method))
    planes = (count_bits(n) if method.aggregation == "mean"
              else 1 + (n % 2 == 0 and getattr(method, "ties", "zero") == "zero"))
    # phase 1: shard j arrives from n - 1 ranks at rank j; phase 2: owner j's result arrives
    # at n - 1 ranks; per rank, the mean over j of both
    per_shard = [2 * wire.HEADER_NBYTES + (1 + planes) * _r4(b1 - b0)
                 for b0, b1 in shard_bounds(-(-numel // 8), n)]
    return (n - 1) * sum(per_shard) // n


def _n_scales(method) -> int:
    return 1 if method.codec.codec == "stochastic_sign" else 0


def route_seconds(method, numel: int, n: int, route: str) -> float:
    """The cost model (ALPHA, BETA, GAMMA above) for one bucket."""
    t = BETA * route_bytes(method, numel, n, route)
    return t + ALPHA if route == "allgather" else t + 2 * ALPHA + GAMMA * numel


def choose(method, mode: str, numel: int, n: int) -> str:
    """The route of a bucket of this method: "allreduce", "allgather" or "alltoall"."""
    if method.collective != "allgather":
        return method.collective
    if squeezed(method):
        return "alltoall"
    if mode == "allgather" or not shardable(method) or n < 2:
        return "allgather"
    if mode == "alltoall":
        return "alltoall"
    a2a = route_seconds(method, numel, n, "alltoall")
    return "alltoall" if a2a < route_seconds(method, numel, n, "allgather") else "allgather"


def _zero_where_set(seg: torch.Tensor, bits: torch.Tensor, k: int) -> None:
    """seg[i] = +0.0 where bit i is set; seg must be +-1 with +1 wherever a bit is set.

    Native unpack to -0.5 / +0.5, + 0.5 gives exactly +0.0 / 1.0, then one multiply: the same
    values as masked_fill, in three vectorised passes instead of numpy's bool unpacking."""
    keep = kernels.unpack_signs(bits, k, scale=0.5).add_(0.5)
    seg.mul_(keep)


class Exchange:
    """Routes each bucket (module docstring); one per engine.

    mode: "auto" (the cost model picks, per bucket, from n and its length), "allgather" or
    "alltoall" (methods that cannot shard keep their own collective under "auto" and
    "allgather"; exchange_problem refuses "alltoall" for them). average / predivide: Horovod's
    op and gradient_predivide_factor, for the dense allreduce.
    """

    def __init__(self, comm, mode: str = "auto", *, average: bool = True,
                 predivide: float = 1.0):
        if mode not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, not {mode!r}")
        self.comm, self.mode = comm, mode
        self.average, self.predivide = average, predivide

    def gaps(self, b, e0: int, k: int) -> torch.Tensor | None:
        """Bucket b's alignment gaps (no tensor lies there) in [e0, e0 + k), as int64 offsets
        from e0, or None: a few elements per tensor, so index_fill_ them rather than mask k."""
        idx = codecs.gap_index(b.layout)
        if idx is None:
            return None
        lo, hi = torch.searchsorted(idx, torch.tensor([e0, e0 + k])).tolist()
        return idx[lo:hi] - e0 if hi > lo else None

    def work(self, b):
        """What the engine encodes for bucket b this step: the bucket itself (a hierarchical
        exchange gives its host slice)."""
        return b

    def route(self, b) -> str:
        return choose(b.active, self.mode, b.layout.numel, self.comm.size)

    def start(self, b, msg: torch.Tensor):
        """Start bucket b's exchange of this rank's payload msg; returns a handle whose wait()
        gives what `aggregate` takes."""
        route = self.route(b)
        if route == "allgather" and self.sparse_switch(b):
            return self._start_sparse(b, msg)
        if route == "allgather":
            return self.comm.allgather(msg, b.name, size_exchange=b.active.variable_size)
        if route == "allreduce":
            f = self.predivide if self.average else 1.0
            return self.comm.allreduce(msg, b.name, prescale=1.0 / f, postscale=f)
        return _ShardedHandle(self, b, msg)

    def aggregate(self, b, result: torch.Tensor) -> torch.Tensor:
        """Bucket b's aggregate (identical on every rank) from its handle's result."""
        if isinstance(b.handle, _ShardedHandle) and not b.handle.fell_back:
            return b.handle.decode(result)
        if isinstance(b.handle, _DenseSparseHandle):
            return _dense_sparse_aggregate(b, result, self.comm.size)
        return b.active.aggregate(result, b.state, b.ctx)

    def sparse_switch(self, b) -> bool:
        """Bucket b's pairs may go as a dense allreduce (module docstring)."""
        return self._switches(b.active)

    def _switches(self, m) -> bool:
        # the error-feedback sparsifiers say how many pairs they send: threshold by a size
        # exchange (variable_size), topk from its layout (segments)
        return (self.mode == "auto" and self.comm.size > 1
                and isinstance(getattr(m, "codec", None), Sparse)
                and callable(getattr(m, "send_whole", None))
                and (m.variable_size or callable(getattr(m, "segments", None))))

    def blocks(self, b) -> bool:
        """Launching bucket b waits for the other ranks (threshold's size exchange ahead of
        the sparse switch), so every rank must launch such buckets in the same order."""
        m = b.method
        return m.collective == "allgather" and self._switches(m) and m.variable_size

    def _start_sparse(self, b, msg: torch.Tensor):
        d, n, method = b.layout.numel, self.comm.size, b.active
        if method.variable_size:
            sizes = self.comm.exchange_sizes(msg.numel(), f"{b.name}.sizes")
        elif method.send_whole(b.ctx):
            sizes = [wire.HEADER_NBYTES + 4 * d] * n
        else:
            segs = method.segments(b.layout)
            nnz = int(torch.minimum(segs[:, 1], segs[:, 2]).sum()) if segs.numel() else 0
            sizes = [wire.payload_nbytes(method.codec.codec, d, nnz=nnz)] * n
        if sum(sizes) <= 8 * d:
            return self.comm.allgather(msg, b.name, size_exchange=False)
        with self.comm.counting:
            extra = self.comm.counters.extra
            extra["sparse_dense_buckets"] = extra.get("sparse_dense_buckets", 0) + 1
        vector, error = _densify(b, msg, self.comm.rank, n)
        return _DenseSparseHandle(self.comm.allreduce(vector, f"{b.name}.dense"), error)


class _ShardedHandle:
    """The two phases of one bucket's sharded exchange; wait() runs the owner's part, or
    future() has the communicator run it (for a front end that chains futures: the DDP hook)."""

    def __init__(self, ex: Exchange, b, msg: torch.Tensor):
        self.ex, self.b, self.comm = ex, b, ex.comm
        n, d = self.comm.size, b.layout.numel
        self.codec = b.active.codec.codec
        self.bounds = shard_bounds(-(-d // 8), n)
        self.elems = shard_elements(d, n)
        self.scaled = squeezed(b.active)
        # the pieces of scaled sign carry the sender's per-tensor scales
        self.n_scales = len(b.layout.sizes) if self.scaled else 0
        self.pieces = [wire.HEADER_NBYTES + 4 * self.n_scales + _r4(b1 - b0)
                       for b0, b1 in self.bounds]
        self.mean = b.active.aggregation == "mean" and not self.scaled
        self.bits = count_bits(n)
        self.msg = msg
        self.fell_back = False
        self.first = self.comm.alltoall(self._pieces(msg), self._splits(), f"{b.name}.shards")
        self.second = None
        self._result = None
        self._future = None

    def future(self):
        """A future completed once both phases (and a fallback) are done, after which wait()
        returns at once: the communicator runs the phases as a follow-up
        (communicator.follow_up), in the order the handles asked, the same on every rank."""
        if self._future is None:
            self._future = self.comm.follow_up(self._run)
        return self._future

    def _splits(self):
        return self.pieces

    def _pieces(self, msg):
        b = self.b
        (p,) = wire.split(msg, 1, bucket=b.name, codec=self.codec, n=b.layout.numel)
        flags = p.header.flags & (wire.FLAG_NONFINITE | wire.FLAG_JOINED | wire.FLAG_FAILED)
        if p.header.flags & wire.FLAG_ZEROS and not flags:
            flags = _FLAG_MARKED
        out = torch.zeros(sum(self.pieces), dtype=torch.uint8)
        scales = (p.scales.view(torch.uint8) if p.scales.numel() == self.n_scales and not flags
                  else None)
        pos = 0
        for (b0, b1), (_, k), size in zip(self.bounds, self.elems, self.pieces):
            out[pos:pos + wire.HEADER_NBYTES] = _header(self.codec, k, flags=flags,
                                                        n_scales=self.n_scales)
            body = pos + wire.HEADER_NBYTES + 4 * self.n_scales
            if scales is not None:
                out[pos + wire.HEADER_NBYTES:body] = scales
            if not flags:
                out[body:body + b1 - b0] = p.body[b0:b1]
            pos += size
        return out

    def wait(self) -> torch.Tensor:
        if self._future is not None:     # the follow-up runs the phases; never twice
            self._future.wait()
            return self._result
        return self._run()

    def _run(self) -> torch.Tensor:
        if self._result is None:
            if self.second is None:
                try:
                    reply = self._own_shard(self.first.wait())
                except Exception as e:  # noqa: BLE001 - the owner answers whatever happened
                    text = (str(e) if isinstance(e, (wire.PayloadError, ValueError))
                            else f"{type(e).__name__}: {e}").encode()
                    reply = _message(self.codec, 0, _FLAG_FAILED, len(text),
                                     torch.frombuffer(bytearray(text), dtype=torch.uint8))
                self.second = self.comm.allgather(reply, f"{self.b.name}.result",
                                                  size_exchange=not (self.mean or self.scaled))
            self._result = self.second.wait()
            if self._marked(self._result):
                # Exact zeros on some rank: every rank saw the same owners' replies, so every
                # rank sends its whole payload again by allgather (the step costs both)
                self.fell_back = True
                self._result = self.comm.allgather(self.msg, f"{self.b.name}.marked",
                                                   size_exchange=True).wait()
        return self._result

    def _marked(self, gathered: torch.Tensor) -> bool:
        pos = 0
        for j in range(self.comm.size):
            h = wire.parse_header(gathered, pos, rank=j, bucket=self.b.name)
            if h.flags & _FLAG_MARKED:
                return True
            pos += wire.HEADER_NBYTES + 4 * h.n_scales + _r4(self._reply_nbytes(h, j))
        return False

    def _reply_nbytes(self, h, j) -> int:
        """Bytes after the header (and scales) of owner j's reply, from its header."""
        (b0, b1) = self.bounds[j]
        plane = _r4(b1 - b0)
        if h.flags & (_FLAG_FAILED | _FLAG_MARKED):
            return h.nnz
        if h.flags & wire.FLAG_NONFINITE:
            return 4 * h.nnz
        if self.scaled:
            return plane
        if self.mean:
            return h.nnz * plane
        return plane + (plane if h.flags & wire.FLAG_DENSE else 4 * h.nnz)

    def _own_shard(self, received: torch.Tensor) -> torch.Tensor:
        """Aggregate this rank's shard from the n pieces it received; the phase 2 message."""
        n, j = self.comm.size, self.comm.rank
        (b0, b1), (_, k), size = self.bounds[j], self.elems[j], self.pieces[j]
        if received.numel() != n * size:
            raise wire.PayloadError(f"bucket {self.b.name}: rank {j} received "
                                    f"{received.numel()} bytes of shards, expected {n * size}")
        voters, bad, failed, marked = [], [], [], False
        for m in range(n):
            h = wire.parse_header(received, m * size, rank=m, bucket=self.b.name)
            if h.codec != self.codec or h.n != k or h.n_scales != self.n_scales:
                raise wire.PayloadError(
                    f"rank {m} sent shard {j} of bucket {self.b.name} as {h.codec!r} with "
                    f"{h.n} elements and {h.n_scales} scales; rank {j} expects "
                    f"{self.codec!r} with {k} and {self.n_scales}")
            if h.flags & wire.FLAG_FAILED:
                failed.append(m)
            elif h.flags & wire.FLAG_NONFINITE:
                bad.append(m)
            elif not h.flags & wire.FLAG_JOINED:
                voters.append(m)
            marked = marked or bool(h.flags & _FLAG_MARKED)
        if failed:      # answered with _FLAG_FAILED and this text (_run)
            raise wire.SenderFailedError(
                f"the method raised on rank(s) {failed} while encoding bucket {self.b.name} "
                f"(see the error there); the step is not applied on any rank")
        if marked and not bad:
            # every rank falls back to the allgather (the double squeeze too: that step is
            # exact ef_signsgd and leaves owner_error as it is, so owner conservation holds)
            return _message(self.codec, k, _FLAG_MARKED, 0)
        if bad:
            return _message(self.codec, k, wire.FLAG_NONFINITE, len(bad),
                            torch.tensor(bad, dtype=torch.int32).view(torch.uint8))
        nb = b1 - b0
        body = wire.HEADER_NBYTES + 4 * self.n_scales
        rows = received.view(n, size)[:, body:body + nb]
        if len(voters) < n:
            rows = rows[voters]
        if self.scaled:
            scales = received.view(n, size)[voters, wire.HEADER_NBYTES:body]
            return self._squeeze(rows, scales.contiguous().view(torch.float32), len(voters))
        if self.mean:
            total = kernels.vote(rows, k, mode="sum")           # voters - 2c, exact
            count = ((len(voters) - total) / 2).to(torch.int32)
            # bit planes of the count, packed by the sign packer: bit set where 0.5 - bit < 0
            planes = [_pad4(kernels.pack_signs(0.5 - ((count >> i) & 1).to(torch.float32)))
                      for i in range(self.bits)]
            return _message(self.codec, k, 0, self.bits, *planes)
        if self.b.active.ties == "owner" and j in voters:
            # ties take this rank's own sign (SignSGD's ties="owner"): weighing it 1.5 moves
            # only the sums that are 0 (the others are odd, or even and at least 2 away)
            w = torch.ones(len(voters))
            w[voters.index(j)] = 1.5
            vote = kernels.vote(rows, k, mode="majority", weights=w)
            return _message(self.codec, k, 0, 0, _pad4(kernels.pack_signs(vote)))
        vote = kernels.vote(rows, k, mode="majority")
        t = kernels.count_zeros(vote)
        signs = _pad4(kernels.pack_signs(vote))
        if t == 0:
            return _message(self.codec, k, 0, 0, signs)
        if 4 * t < _r4(nb):
            ties = (vote == 0).nonzero().flatten()
            return _message(self.codec, k, 0, t, signs, ties.to(torch.int32).view(torch.uint8))
        # the vote is -1, +0.0 or 1 (a tie's sign bit is clear), so |vote| - 0.5 < 0 at ties
        return _message(self.codec, k, wire.FLAG_DENSE, t, signs,
                        _pad4(kernels.pack_signs(vote.abs().sub_(0.5))))

    def _squeeze(self, rows, scales, v) -> torch.Tensor:
        """Double squeeze on this rank's shard: a = mean_m q_m + owner_error,
        Q = (||a||_1 / |a|) sign(a), owner_error <- a - Q (alignment gaps stay 0)."""
        j = self.comm.rank
        e0, k = self.elems[j]
        segments, tensors = [], []
        for t, (o, s) in enumerate(self.b.layout.segments()):
            lo, hi = max(o, e0), min(o + s, e0 + k)
            if lo < hi:     # layout offsets and shard starts are multiples of 8 elements
                segments.append((lo - e0, hi - lo))
                tensors.append(t)
        mean = torch.zeros(k)
        if segments:
            kernels.scaled_vote(rows, segments, (scales[:, tensors] / v).t().contiguous(), mean)
        a = self.b.state["owner_error"][e0:e0 + k]
        a.add_(mean)                                   # the memory now holds a
        gaps = self.ex.gaps(self.b, e0, k)
        real = k - (0 if gaps is None else gaps.numel())
        scale = torch.tensor(float(a.abs().sum()) / max(real, 1), dtype=torch.float32)
        signs = kernels.pack_signs(a)
        q = kernels.unpack_signs(signs, k, scale=scale)
        if gaps is not None:
            q.index_fill_(0, gaps, 0.0)
        a.sub_(q)                                      # owner_error <- a - Q
        return _message(self.codec, k, 0, 0, scale.view(1).view(torch.uint8), _pad4(signs),
                        n_scales=1)

    def decode(self, gathered: torch.Tensor) -> torch.Tensor:
        """The bucket's aggregate from the n owners' results, written into ctx.out."""
        b, ctx = self.b, self.b.ctx
        out = ctx.out if ctx.out is not None else torch.zeros(b.layout.numel)
        pos = 0
        for j, ((b0, b1), (e0, k)) in enumerate(zip(self.bounds, self.elems)):
            h = wire.parse_header(gathered, pos, rank=j, bucket=b.name)
            if h.codec != self.codec or (h.n != k and not h.flags & _FLAG_FAILED):
                raise wire.PayloadError(f"rank {j} returned shard {j} of bucket {b.name} as "
                                        f"{h.codec!r} with {h.n} elements; expected "
                                        f"{self.codec!r} with {k}")
            body = pos + wire.HEADER_NBYTES
            plane = _r4(b1 - b0)
            if h.flags & _FLAG_FAILED:
                text = bytes(gathered[body:body + h.nnz].tolist()).decode(errors="replace")
                raise wire.PayloadError(f"rank {j} could not aggregate its shard of bucket "
                                        f"{b.name}: {text}")
            if h.flags & wire.FLAG_NONFINITE:
                bad = gathered[body:body + 4 * h.nnz].clone().view(torch.int32).tolist()
                raise NonFiniteGradientError(
                    f"NaN or Inf in the gradient of rank(s) {bad} (bucket {ctx.bucket}, step "
                    f"{ctx.step}); the step is not applied on any rank. Lower the learning "
                    f"rate, clip gradients, or check the data.")
            seg = out[e0:e0 + k]
            if self.scaled:
                scale = gathered[body:body + 4].clone().view(torch.float32)
                kernels.unpack_signs(gathered[body + 4:body + 4 + b1 - b0], k, scale=scale[0],
                                     out=seg)
                gaps = self.ex.gaps(b, e0, k)
                if gaps is not None:
                    seg.index_fill_(0, gaps, 0.0)
                if not ctx.average:
                    seg.mul_(ctx.size)
                end = body + 4 + plane
            elif self.mean:
                # plane i unpacked with scale 2^i is 2^i - 2^(i+1) bit_i; their sum is
                # (2^b - 1) - 2c, so voters - 2c follows in exact float32 integers
                v = len(ctx.voters) if ctx.voters is not None else ctx.size
                tmp = torch.empty(k) if h.nnz > 1 else None
                for i in range(h.nnz):
                    bits = gathered[body + i * plane:body + i * plane + b1 - b0]
                    kernels.unpack_signs(bits, k, scale=float(2 ** i), out=seg if i == 0 else tmp)
                    if i:
                        seg.add_(tmp)
                seg.add_(float(v - (2 ** h.nnz - 1)))
                seg.div_(v)
                if not ctx.average:
                    seg.mul_(ctx.size)
                end = body + h.nnz * plane
            else:
                kernels.unpack_signs(gathered[body:body + b1 - b0], k, out=seg)
                end = body + plane
                if h.flags & wire.FLAG_DENSE:
                    _zero_where_set(seg, gathered[end:end + b1 - b0], k)
                    end += plane
                elif h.nnz:
                    idx = gathered[end:end + 4 * h.nnz].clone().view(torch.int32)
                    seg[idx.to(torch.int64)] = 0.0
                    end += 4 * h.nnz
            pos = end
        if pos != gathered.numel():
            raise wire.PayloadError(f"bucket {b.name}: {gathered.numel() - pos} trailing bytes "
                                    f"after the shard results")
        return out


class _DenseSparseHandle:
    """A bucket of pairs on its way as a float32 allreduce (module docstring). error: this
    rank's own payload could not be read; raised here once the allreduce is done (the other
    ranks raise SenderFailedError for its status slot)."""

    def __init__(self, handle, error: Exception | None = None):
        self.handle, self.error = handle, error

    def wait(self) -> torch.Tensor:
        total = self.handle.wait()
        if self.error is not None:
            raise self.error
        return total

    def future(self) -> torch.futures.Future:
        return self.handle.future()


def _densify(b, msg: torch.Tensor, rank: int, size: int):
    """(vector, error): this rank's payload as a float32 vector of the bucket, its pairs (or
    dense fallback) scattered into zeros (zeros for a joined rank), then `size` status slots
    in which this rank marks its own when its gradient was not finite or its method raised.
    A payload that cannot be read (error) is marked as failed rather than raised here, where
    the other ranks would wait in the allreduce."""
    d = b.layout.numel
    out = torch.zeros(d + size)
    try:
        (p,) = wire.split(msg, 1, bucket=b.name, codec=b.active.codec.codec, n=d)
        flags = p.header.flags
        if not flags & (wire.FLAG_FAILED | wire.FLAG_NONFINITE | wire.FLAG_JOINED):
            b.active.codec.aggregate([p], d, b.name, out=out[:d])
    except wire.PayloadError as e:
        out.zero_()
        out[d + rank] = FAILED_SLOT
        return out, e
    if flags & wire.FLAG_FAILED:
        out[d + rank] = FAILED_SLOT
    elif flags & wire.FLAG_NONFINITE:
        out[d + rank] = NONFINITE_SLOT
    return out, None


def _dense_sparse_aggregate(b, total: torch.Tensor, size: int) -> torch.Tensor:
    ctx, d = b.ctx, b.layout.numel
    check_status_slots(total[d:d + size].tolist(), ctx, ", pairs summed densely")
    if not kernels.all_finite(total[:d]):       # finite on every rank, the sum overflowed
        raise NonFiniteGradientError(
            f"the ranks' gradients summed to Inf (bucket {ctx.bucket}, step {ctx.step}, pairs "
            f"summed densely); the step is not applied on any rank")
    out = ctx.out if ctx.out is not None else torch.zeros(d)
    out.copy_(total[:d])
    return as_mean(out, ctx)


def make_exchange(comm, mode: str = "auto", *, average: bool = True, predivide: float = 1.0):
    """The Exchange of `mode` (HierarchicalExchange for "hierarchical")."""
    cls = HierarchicalExchange if mode == "hierarchical" else Exchange
    return cls(comm, mode, average=average, predivide=predivide)


def slice_layout(layout: Layout, e0: int, k: int) -> Layout:
    """The pieces of layout's tensors inside elements [e0, e0 + k) (e0 a multiple of 8), as
    a Layout of their own: its elements are those of the bucket from e0 on."""
    offsets, sizes = [], []
    for o, s in layout.segments():
        lo, hi = max(o, e0), min(o + s, e0 + k)
        if lo < hi:
            offsets.append(lo - e0)
            sizes.append(hi - lo)
    return Layout(tuple(offsets), tuple(sizes))


@dataclass
class _Part:
    """This rank's slice of a bucket under the hierarchical exchange: what the method encodes
    and the cross exchange moves (it has the fields of engine.Bucket that Exchange reads)."""
    name: str
    layout: Layout
    offset: int             # first element in the whole model (RNG stream position)
    start: int              # first element in the bucket
    state: dict
    active: object = None
    flat: torch.Tensor = None
    out: torch.Tensor = None
    ctx: object = None
    handle: object = None


class _Ready:
    """A handle whose result is known (an empty slice exchanges nothing across hosts)."""

    def wait(self):
        return torch.zeros(0, dtype=torch.uint8)


class _CrossHandle:
    """The cross-host exchange of this rank's slice. wait() never raises: it returns the
    result or the exception, which aggregate() sends to the host's other ranks as a status,
    since they wait for this rank's slice in the host's allgather."""

    def __init__(self, handle):
        self.handle = handle

    def wait(self):
        try:
            return self.handle.wait()
        except Exception as e:  # noqa: BLE001 - reported to the host (aggregate)
            return e


class ExchangeError(RuntimeError):
    """A rank's part of an exchange failed (an error that is not a NaN/Inf gradient nor a
    malformed payload); raised on every rank that waits for that part."""


_OK, _NONFINITE, _FAILED, _ERROR = 0, 1, 2, 3


def parse_local_size(text: str | None, n: int) -> tuple[int | None, str | None]:
    """(ranks per host, problem) from HVD_SIGNSGD_LOCAL_SIZE's value: (None, None) when unset
    or blank (the library's hosts). Never raises: the engine reports the problem on every rank
    (Engine.validate), so a bad value on one rank cannot leave the others waiting."""
    text = (text or "").strip()
    if not text:
        return None, None
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1 or n % size:
        return None, (f"{LOCAL_SIZE_ENV}={text!r} is not a number of ranks per host that "
                      f"divides the {n} ranks into hosts of equal size (a positive integer)")
    return size, None


class HierarchicalExchange(Exchange):
    """exchange="hierarchical" (module docstring). local_size: ranks per host, as blocks of
    consecutive ranks, instead of the library's hosts (default: the environment variable
    HVD_SIGNSGD_LOCAL_SIZE, else the library's). setup() splits the communicator
    (collective); the engine calls it once every rank agreed on the options."""

    def __init__(self, comm, mode: str = "hierarchical", *, average: bool = True,
                 predivide: float = 1.0, local_size: int | None = None):
        super().__init__(comm, "auto", average=average, predivide=predivide)
        self.mode = "hierarchical"
        self.problem = None
        if local_size is None:
            local_size, self.problem = parse_local_size(os.environ.get(LOCAL_SIZE_ENV),
                                                        comm.size)
        self.local_size = local_size
        self.local = self.cross = self.inner = None

    def setup(self) -> None:
        if self.local is None:
            self.local, self.cross = self.comm.split_local(self.local_size)
            self.inner = Exchange(self.cross, "auto", average=self.average)

    @property
    def width(self) -> int:
        """L, ranks per host (after setup)."""
        return self.local.size

    def bounds(self, b) -> list[tuple[int, int]]:
        """[(first element, element count)] of the L slices of bucket b."""
        return shard_elements(b.layout.numel, self.local.size)

    def part(self, b) -> _Part:
        """This rank's slice of bucket b (cached; its layout is what the state is sized to)."""
        p = getattr(b, "part", None)
        if p is None or p.name != f"{b.name}.x{self.local.rank}":
            e0, k = self.bounds(b)[self.local.rank]
            layout = slice_layout(b.layout, e0, k)
            p = _Part(f"{b.name}.x{self.local.rank}", layout, b.offset + e0, e0, b.state,
                      out=torch.zeros(layout.numel))
            b.part = p
        return p

    def state_layout(self, b) -> Layout:
        return self.part(b).layout

    def hierarchical(self, b) -> bool:
        return not isinstance(b.active, NoCompression) and self.comm.size > 1

    def blocks(self, b) -> bool:
        """The host's allreduce in work() waits for the host's ranks (compressed buckets;
        warm-up steps, which take the flat route, included: the order costs them nothing)."""
        return not isinstance(b.method, NoCompression) and self.comm.size > 1

    def work(self, b):
        """Step 1 for bucket b (blocking): the host mean into b.flat; returns this rank's
        part, with its context for the H ranks of the cross exchange (or b itself for a
        bucket on the flat route)."""
        if not self.hierarchical(b):
            return b
        p = self.part(b)
        p.state, p.active = b.state, b.active
        f = 1.0 / self.local.size if self.average else 1.0
        self.local.allreduce(b.flat, f"{b.name}.local", prescale=f).wait()
        p.flat = b.flat[p.start:p.start + p.layout.numel]
        n = self.cross.size
        p.ctx = dataclasses.replace(
            b.ctx, rank=self.cross.rank, size=n, n_ranks=n, voters=list(range(n)),
            bucket=p.name, offset=p.offset, layout=p.layout, out=p.out, stats={},
            nonfinite=not kernels.all_finite(p.flat))
        return p

    def start(self, b, msg: torch.Tensor):
        if not self.hierarchical(b):
            return super().start(b, msg)
        p = b.part
        p.handle = self.inner.start(p, msg) if p.layout.numel else _Ready()
        return _CrossHandle(p.handle)

    def aggregate(self, b, result) -> torch.Tensor:
        """Step 3 for bucket b: this rank's slice of the update (or its failure, whatever it
        was) goes to the host's other ranks, which wait for it, so every rank of the host
        returns the same update or raises the same error. result: what the cross handle's
        wait() gave, the exception it raised included."""
        if not self.hierarchical(b):
            return super().aggregate(b, result)
        p = b.part
        k = p.layout.numel
        status, text, cause = _OK, "", None
        try:
            if isinstance(result, Exception):
                raise result
            update = self.inner.aggregate(p, result) if k else p.out
            body = update[:k].to(torch.float32).contiguous().view(torch.uint8)
            if body.numel() != 4 * k:
                raise wire.PayloadError(f"the aggregate of {p.name} has {update.numel()} "
                                        f"elements, expected {k}")
        except NonFiniteGradientError as e:
            status, text = _NONFINITE, f"{e} [host slice {self.local.rank}]"
        except (wire.PayloadError, ValueError) as e:
            status, text = _FAILED, f"{e} [host slice {self.local.rank}]"
        except Exception as e:  # noqa: BLE001 - the host's other ranks must hear of it
            status, cause = _ERROR, e
            text = f"{type(e).__name__}: {e} [host slice {self.local.rank}]"
        if status != _OK:
            body = torch.zeros(4 * k, dtype=torch.uint8)
            raw = text.encode()[:4 * k]
            body[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        msg = torch.cat([torch.tensor([status], dtype=torch.int32).view(torch.uint8), body])
        lengths = [slice_layout(b.layout, e0, n).numel for e0, n in self.bounds(b)]
        gathered = self.local.allgather(msg, f"{b.name}.slices",
                                        size_exchange=len(set(lengths)) > 1).wait()
        out = b.ctx.out if b.ctx.out is not None else torch.zeros(b.layout.numel)
        out.zero_()
        pos, problems = 0, []
        for i, ((e0, _), n) in enumerate(zip(self.bounds(b), lengths)):
            (st,) = gathered[pos:pos + 4].clone().view(torch.int32).tolist()
            seg = gathered[pos + 4:pos + 4 + 4 * n]
            if st == _OK:
                out[e0:e0 + n] = seg.clone().view(torch.float32)
            else:
                msg = bytes(seg.tolist()).rstrip(b"\0").decode(errors="replace")
                problems.append((st, msg or f"(slice {i} of bucket {b.name} failed)"))
            pos += 4 + 4 * n
        if pos != gathered.numel():
            raise wire.PayloadError(f"bucket {b.name}: the host's slices came to "
                                    f"{gathered.numel()} bytes, expected {pos}")
        for st, msg in problems:
            if st == _NONFINITE:
                raise NonFiniteGradientError(msg)
        for st, msg in problems:
            if st == _ERROR:
                raise ExchangeError(f"hvd_signsgd: the cross-host exchange of bucket {b.name} "
                                    f"failed on this host: {msg}") from cause
        if problems:
            raise wire.PayloadError(problems[0][1])
        return out


def _header(codec: str, n: int, flags: int = 0, nnz: int = 0, n_scales: int = 0) -> torch.Tensor:
    raw = wire.Header(codec, n, n_scales=n_scales, nnz=nnz, flags=flags).pack()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _pad4(t: torch.Tensor) -> torch.Tensor:
    pad = _r4(t.numel()) - t.numel()
    return torch.cat([t, torch.zeros(pad, dtype=torch.uint8)]) if pad else t


def _message(codec: str, n: int, flags: int, nnz: int, *parts, n_scales: int = 0) -> torch.Tensor:
    return _pad4(torch.cat([_header(codec, n, flags, nnz, n_scales),
                            *[p.reshape(-1) for p in parts]]))


__all__ = ["EXCHANGES", "Exchange", "ExchangeError", "HierarchicalExchange", "choose",
           "make_exchange", "parse_local_size", "slice_layout", "count_bits",
           "exchange_problem", "route_bytes", "route_seconds", "shard_bounds",
           "shard_elements", "shardable"]
