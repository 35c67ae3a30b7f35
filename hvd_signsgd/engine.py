"""The engine both front ends drive: a method's buckets, their exchange, checks and statistics.

A front end (the Horovod `DistributedOptimizer`, the DDP communication hook) owns the hooks and
the way gradients reach a bucket's flat buffer. Everything after that is here, once:

    engine = Engine(comm, method, seed=..., start_step=..., on_nonfinite="raise")
    engine.build(chunks)                      # buckets from [(names, sizes)] lists
    engine.validate(problem)                  # the same model, method and options everywhere
    engine.begin_step()                       # the step's control record (below), once a step
    engine.launch(buckets)                    # encode each bucket, start its collective
    outcome = engine.finish()                 # wait, aggregate into each bucket's flat buffer

A front end that receives buckets one at a time and must answer each on its own (the DDP
communication hook) grows the buckets as they arrive (`add_bucket`, `drop_buckets` when its
buckets change), launches each alone, and finishes them one by one (`finish_bucket`, in any
order) before closing the step (`end_step`); finish() is exactly that for all buckets.

The step protocol. Each step starts with one small control exchange, an allreduce of one
int64 record per rank (slot r holds rank r's record, the others send zeros):
    alive (1), the step counter, flags (loaded state, local problem, joined).
It is an allreduce because Horovod's join can carry allreduces but not allgathers: a rank
inside `hvd.join()` contributes zeros, so the others see its record missing and raise instead of
hanging. From the records every rank learns the same facts: which ranks vote this step (not
joined), the step counter to use (a rank that loaded a checkpoint brings its counter; see
`_reconcile`), and whether any rank's loaded state is unusable (then every rank raises the same
error).

Non-finite gradients. A rank whose bucket holds NaN/Inf flags its payload and leaves its state
alone; ranks with finite gradients have updated theirs by the time the flag arrives. So before
encoding, the state of each stateful bucket is copied to a backup, and a step in which any rank
was non-finite restores every bucket from it, on every rank: the method state is exactly as
before the step. Methods with fused kernels (method.encode_checks_finite) find NaN/Inf in their
own prepare or encode (signsgd, and every method below), and keys they write out of place
(method.self_restored_keys: the error memory of ef_signsgd, ecx, topk and threshold without
perturbation, signum's and ssdm's momentum) are not copied: method.rollback swaps the old
buffer back, method.commit keeps the new. The hierarchical exchange still checks the slice it
encodes (a host sum can overflow).
Then on_nonfinite="raise" raises NonFiniteGradientError on every rank, and
"skip" writes NaN into every gradient (so `torch.amp.GradScaler` sees the overflow and skips
the step, as with Horovod) and reports `skipped`.

Nothing here imports a communication library: `comm` is a `communicator.Communicator`.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import kernels
from .codecs import Layout
from .communicator import Counters
from .exchange import make_exchange
from .methods import Method, NoCompression, NonFiniteGradientError, StepContext

_FLAG_LOADED = 1       # this rank loaded a checkpoint section since the last step
_FLAG_PROBLEM = 2      # ... and it cannot be used (the message is exchanged separately)
_FLAG_JOINED = 4       # this rank has joined (optimizer.join()): it sends nothing, votes nothing
_FLAG_SPARSE = 8       # this rank has seen sparse gradients: the front end's sparse exchange runs
_RECORD = 4            # int64 fields per rank: alive, step, flags, reserved


class StepError(RuntimeError):
    """A step cannot run: the ranks disagree about something only a step reveals."""


@dataclass
class Bucket:
    index: int
    name: str
    names: list             # parameter names, layout order
    layout: Layout
    method: Method
    offset: int             # first element in the whole model (RNG stream position)
    flat: torch.Tensor
    state: dict = field(default_factory=dict)
    backup: dict = field(default_factory=dict)
    saved: bool = False     # backup holds this step's state (the bucket was launched)
    handle: object = None
    ctx: StepContext = None
    active: Method = None   # the method used this step (the dense one during warm-up)
    part: object = None     # exchange="hierarchical": this rank's slice (exchange._Part)
    work: object = None     # what this step encodes: the bucket, or its part
    failed: Exception = None  # what the method raised on this rank this step (Engine._fail)


@dataclass
class Outcome:
    """What a step's exchange came to: applied, or skipped for non-finite gradients."""
    skipped: bool = False
    error: NonFiniteGradientError | None = None


_LAYOUTS = collections.defaultdict(itertools.count)   # name prefix -> engines validated so far


def layout_digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class Engine:
    """Buckets of one method on one communicator, and the step protocol (module docstring).

    on_nonfinite: "raise" (NonFiniteGradientError on every rank) or "skip" (every gradient
    becomes NaN, nothing of the method's state changes; the front end skips the step).
    """

    def __init__(self, comm, method: Method, *, seed: int = 0, start_step: int = 0,
                 average: bool = True, predivide: float = 1.0, on_nonfinite: str = "raise",
                 exchange: str = "auto"):
        self.comm = comm
        self.exchange = make_exchange(comm, exchange, average=average, predivide=predivide)
        self.method = method
        self.dense = NoCompression()
        self.seed, self.start_step = seed, start_step
        self.average, self.predivide = average, predivide
        self.on_nonfinite = on_nonfinite
        self.buckets: list[Bucket] = []
        self.step = 0
        self.prefix = "hvd_signsgd"
        self.totals, self.last = Counters(), Counters()
        self._loaded = None          # (step, problem) of a checkpoint section loaded locally
        self._joined = False
        self.sparse_seen = False     # set by a front end that met a sparse gradient
        self.sparse_mode = False     # any rank has: this step has a sparse exchange
        self._active_ranks = None    # ranks that vote this step (None: before begin_step)
        self._step_started = False
        self.launch_times = []       # (bucket indices, start, end) of this step's encodes
        self._counted = False
        self._failure = None         # the first error a method raised on this rank this step

    # --- construction -------------------------------------------------------------------------

    def build(self, chunks) -> None:
        """chunks: [(names, sizes, method)] in launch order; method None means the engine's."""
        for names, sizes, method in chunks:
            self.add_bucket(names, sizes, method)
        # Collectives are named from what they carry, so that ranks agree on the names
        # whatever else they have built, and a disagreement is an error, not a hang.
        self._rename(f"hvd_signsgd.{layout_digest(self.describe_buckets())[:12]}")

    def _rename(self, prefix: str) -> None:
        self.prefix = prefix
        for b in self.buckets:
            b.name = f"{prefix}.b{b.index}"

    def add_bucket(self, names, sizes, method: Method | None = None) -> Bucket:
        """Append one bucket after the others (for a front end that learns its buckets as they
        arrive); its offset follows the last bucket's. The collective prefix stays as it is:
        name-free libraries (torch.distributed) do not need build()'s digest."""
        method = method or self.method
        layout = Layout.for_sizes(sizes)
        last = self.buckets[-1] if self.buckets else None
        offset = last.offset + last.layout.numel if last else 0
        b = Bucket(len(self.buckets), "", list(names), layout, method, offset,
                   flat=torch.zeros(layout.numel))
        b.name = f"{self.prefix}.b{b.index}"
        b.state = method.init_state(layout)
        b.backup = _backup_for(b)
        self.buckets.append(b)
        return b

    def drop_buckets(self, start: int = 0) -> list[Bucket]:
        """Remove and return the buckets from index `start` on (a front end whose buckets
        changed moves their state to the new ones itself). None may be in flight."""
        dropped, self.buckets = self.buckets[start:], self.buckets[:start]
        assert all(b.handle is None for b in dropped), "a bucket in flight cannot be dropped"
        return dropped

    def describe_buckets(self):
        return [(b.method.describe(), list(zip(b.names, b.layout.sizes))) for b in self.buckets]

    @property
    def compressed(self) -> list[Bucket]:
        return [b for b in self.buckets if not isinstance(b.method, NoCompression)]

    def validate(self, problem: str | None, options: tuple = ()) -> None:
        """Raise the same ValueError on every rank if any rank has a problem or the ranks
        differ in model, method or options (seed and start_step included)."""
        desc = self.describe_buckets()
        options = (*options, ("exchange", self.exchange.mode))
        if self.exchange.mode == "hierarchical":
            # HVD_SIGNSGD_LOCAL_SIZE is read on each rank: a bad or differing value is
            # reported here, where every rank learns it, not where it was read
            problem = problem or self.exchange.problem
            options = (*options, ("local_size", self.exchange.local_size))
        digest = layout_digest(self.method.describe() if self.method else None, desc,
                               self.seed, self.start_step, self.average, self.predivide,
                               self.on_nonfinite, options)
        mine = (problem, digest, desc, (self.seed, self.start_step, options))
        views = self.comm.allgather_object(mine, name="hvd_signsgd.validate")
        problems = [(r, pr) for r, (pr, *_) in enumerate(views) if pr]
        if problems:
            raise ValueError("hvd_signsgd: " + "; ".join(f"rank {r}: {pr}" for r, pr in problems))
        if len({v[1] for v in views}) > 1:
            raise ValueError("hvd_signsgd: the ranks do not agree on the model, the method or "
                             "its options. " + _first_difference(views))
        if hasattr(self.exchange, "setup") and self.comm.included:
            self._setup_exchange()
        if self.buckets and not self._counted:
            # The count of earlier validated engines of this layout in this process keeps the
            # names of identical models trained side by side apart; counted only here, once
            # every rank agrees, so that a failed construction on some ranks shifts nothing.
            self._counted = True
            self._rename(f"{self.prefix}.{next(_LAYOUTS[self.prefix])}")

    def _setup_exchange(self) -> None:
        """Hierarchical exchange: split the communicator (every rank agreed on it, so every
        rank is here) and size each bucket's state to this rank's slice."""
        if self.exchange.local is not None:
            return
        self.exchange.setup()
        for b in self.buckets:
            b.state = b.method.init_state(self.exchange.state_layout(b))
            b.backup = _backup_for(b)

    # --- the step --------------------------------------------------------------------------------

    @property
    def step_started(self) -> bool:
        return self._step_started

    def begin_step(self) -> list[int]:
        """The control exchange (module docstring), once per step, before any bucket leaves.
        Returns the ranks that vote this step."""
        if self._step_started:
            return self._active_ranks
        n, r = self.comm.size, self.comm.rank
        flags = (_FLAG_JOINED if self._joined else 0) | (_FLAG_SPARSE if self.sparse_seen else 0)
        if self._loaded is not None:
            flags |= _FLAG_LOADED | (_FLAG_PROBLEM if self._loaded[1] else 0)
        record = torch.zeros(n * _RECORD, dtype=torch.int64)
        record[r * _RECORD:(r + 1) * _RECORD] = torch.tensor([1, self.step, flags, 0])
        records = self.comm.control(record, name=f"{self.prefix}.control").view(n, _RECORD)
        self._step_started = True
        self.launch_times = []
        alive, steps, flags = records[:, 0].tolist(), records[:, 1].tolist(), records[:, 2].tolist()
        missing = [k for k in range(n) if not alive[k]]
        if missing:
            self._abort_step()
            raise StepError(
                f"hvd_signsgd: rank(s) {missing} did not take part in this step's exchange: "
                f"they are probably inside hvd.join(), which cannot carry compressed exchanges "
                f"(Horovod's join covers allreduce only). Call optimizer.join() instead of "
                f"hvd.join() on a rank that has run out of data.")
        if any(f & _FLAG_PROBLEM for f in flags):
            self._raise_load_problems(flags)
        self._reconcile(steps, flags)
        self.sparse_mode = any(f & _FLAG_SPARSE for f in flags)
        self._active_ranks = [k for k in range(n) if not flags[k] & _FLAG_JOINED]
        if self.exchange.mode == "hierarchical" and len(self._active_ranks) < n:
            self._abort_step()
            joined = sorted(set(range(n)) - set(self._active_ranks))
            raise StepError(f"hvd_signsgd: rank(s) {joined} "
                            f"joined (optimizer.join()), which exchange='hierarchical' does not "
                            f"support: every rank of a host reduces its gradients with the "
                            f"others")
        return self._active_ranks

    def _raise_load_problems(self, flags):
        mine = self._loaded[1] if self._loaded else None
        problems = self.comm.allgather_object(mine, name=f"{self.prefix}.problems")
        self._loaded = None
        self._abort_step()
        raise ValueError("hvd_signsgd: cannot resume: " + "; ".join(
            f"rank {k}: {p}" for k, p in enumerate(problems) if p))

    def _reconcile(self, steps, flags):
        """After a checkpoint was loaded on some ranks (rank 0 alone, in Horovod's idiom), every
        rank continues from the loaded step counter; a rank that loaded nothing keeps a fresh
        method state, and says so once."""
        loaded = {steps[k] for k in range(len(steps)) if flags[k] & _FLAG_LOADED}
        if len(loaded) > 1:
            self._abort_step()
            raise ValueError(f"hvd_signsgd: cannot resume: the ranks loaded checkpoints of "
                             f"different steps ({sorted(loaded)}); load the files of one save")
        if not loaded and len(set(steps)) > 1:
            self._abort_step()
            raise StepError(f"hvd_signsgd: the ranks are at different steps ({steps}); every "
                            f"rank must call step() (or synchronize()) the same number of times")
        if loaded:
            (target,) = loaded
            if self.step != target and self.compressed and any(b.state for b in self.buckets):
                warnings.warn(f"hvd_signsgd: rank {self.comm.rank} loaded no checkpoint: its "
                              f"method state (error memory / momentum) starts fresh at step "
                              f"{target}. Save and load one file per rank to resume it "
                              f"exactly.", stacklevel=4)
            self.step = target
        self._loaded = None

    def join(self) -> None:
        """From now on this rank sends nothing and votes nothing (optimizer.join())."""
        self._joined = True

    @property
    def voters(self) -> list[int]:
        """The ranks that vote this step (after begin_step)."""
        return self._active_ranks

    def context(self, b: Bucket, nonfinite: bool) -> StepContext:
        return StepContext(step=self.step, rank=self.comm.rank, size=len(self._active_ranks),
                           bucket=b.name, offset=b.offset, layout=b.layout, seed=self.seed,
                           average=self.average, out=b.flat, nonfinite=nonfinite,
                           n_ranks=self.comm.size, voters=self._active_ranks,
                           method_step=self.step - self.start_step)

    def launch_blocks(self, b: Bucket) -> bool:
        """launch([b]) waits for the other ranks (a blocking collective of the exchange), so
        a front end must launch such buckets in the same order on every rank: the order of
        the buckets' indices."""
        return self.exchange.blocks(b)

    def launch(self, buckets: list[Bucket]) -> None:
        """Encode each bucket's flat buffer and start its collective; all at once for methods
        with a whole-model norm. begin_step() must have run."""
        assert self._step_started, "begin_step() first"
        t0 = time.perf_counter()
        warm = self.step < self.start_step
        for b in buckets:
            b.failed = None
            b.active = self.dense if warm else b.method
            compressed = b.active is not self.dense
            # a method that checks NaN/Inf in its own encode sets ctx.nonfinite itself
            b.ctx = self.context(b, compressed and not self._joined
                                 and not b.active.encode_checks_finite
                                 and not kernels.all_finite(b.flat))
        method = buckets[0].active
        if method.model_scope and any(b.ctx.nonfinite for b in buckets):
            for b in buckets:     # no finite whole-model norm: every bucket reports it
                b.ctx.nonfinite = True
        for b in buckets:
            if list(b.backup) != _backed_up(b):     # method.fused changed after the build
                b.backup = _backup_for(b)
            for k, v in b.backup.items():     # restored if any rank is non-finite
                v.copy_(b.state[k])
            b.saved = True
            # the hierarchical exchange reduces on the host first and encodes a slice
            b.work = b if self._joined else self.exchange.work(b)
            if not self._joined:
                self._guarded(b, b.active.prepare, b.work.flat, b.state, b.work.ctx)
        if method.model_scope and any(b.ctx.nonfinite for b in buckets):
            for b in buckets:     # a fused prepare (ssdm) found NaN/Inf in some bucket
                b.ctx.nonfinite = True
        if method.model_scope and not self._joined:
            try:
                norm = method.combine_norms([method.norm_part(b.flat, b.state, b.ctx)
                                             for b in buckets])
            except Exception as e:  # noqa: BLE001 - encode_failed is sent, raised in finish
                for b in buckets:
                    self._fail(b, e)
                norm = 0.0
            for b in buckets:
                b.ctx.model_norm = norm
        for b in buckets:
            self._send(b)
        t1 = time.perf_counter()
        self.comm.counters.seconds_encode += t1 - t0
        self.launch_times.append(([b.index for b in buckets], t0, t1))

    def _guarded(self, b: Bucket, fn, *args):
        """fn(*args) for bucket b, unless its method already failed this step (_fail)."""
        if b.failed is None:
            try:
                return fn(*args)
            except Exception as e:  # noqa: BLE001 - encode_failed is sent, raised in finish
                self._fail(b, e)
        return None

    def _fail(self, b: Bucket, error: Exception) -> None:
        """b's method raised on this rank. Raising here would leave the other ranks waiting in
        the bucket's collective, so the method's encode_failed payload goes instead: they
        raise SenderFailedError, and this rank raises the error itself once the step's
        collectives are done (finish). The dense baselines (none, fp16) raise at once."""
        if not b.active.reports_failures:
            raise error
        b.failed = error
        if self._failure is None:
            self._failure = error

    def _send(self, b: Bucket) -> None:
        w = b.work
        if self._joined:
            msg = b.active.encode_joined(w.flat, w.ctx)
        else:
            msg = self._guarded(b, b.active.encode, w.flat, b.state, w.ctx)
            if b.failed is not None:
                try:
                    msg = b.active.encode_failed(w.ctx)
                except Exception:  # noqa: BLE001 - nothing to send instead: raise at once
                    raise b.failed from None
        extra = self.comm.counters.extra
        for k, v in w.ctx.stats.items():      # method counts (nnz_sent, dense_fallbacks, ...)
            extra[k] = extra.get(k, 0) + v
        b.handle = self.exchange.start(b, msg)

    def finish(self) -> Outcome:
        """Wait for every bucket in a fixed order and aggregate it into its flat buffer
        (identical on every rank). A non-finite step restores every bucket's state."""
        error = None
        try:
            for b in self.buckets:
                if error is None:
                    error = self.finish_bucket(b)
                else:
                    b.handle.wait()     # finish the collectives in flight; nothing is applied
        except Exception:
            self.raise_own_failure()
            raise
        self.raise_own_failure()        # the front end drains and restores
        return self.end_step(error)

    def raise_own_failure(self) -> None:
        """Raise what this rank's method raised this step (_fail), if it did: the other ranks
        raise SenderFailedError for it."""
        if self._failure is not None:
            raise self._failure

    def finish_bucket(self, b: Bucket) -> NonFiniteGradientError | None:
        """Wait for one bucket and aggregate it into b.flat (identical on every rank). Returns
        the NonFiniteGradientError of a step in which some rank was non-finite in this bucket
        (b.flat is then not an update), to be passed to end_step()."""
        result = b.handle.wait()
        t0 = time.perf_counter()
        try:
            update = self.exchange.aggregate(b, result)
            if b.active is self.dense and not isinstance(self.method, NoCompression) \
                    and not kernels.all_finite(update):
                raise NonFiniteGradientError(
                    f"NaN or Inf in the uncompressed small tensors of at least one rank "
                    f"(bucket {b.name}, step {self.step})")
        except NonFiniteGradientError as e:
            return e
        if update is not b.flat:
            b.flat.copy_(update)
        if b.active is self.dense and b.method is not self.dense:
            b.method.warmup_rescale(b.flat, b.layout)
        c = self.comm.counters
        c.seconds_decode += time.perf_counter() - t0
        c.dense_fp32_bytes += 4 * b.layout.real_numel
        return None

    def end_step(self, error: NonFiniteGradientError | None = None) -> Outcome:
        """Close a step whose buckets are all finished: advance the step counter and book the
        counters, or, after a NaN/Inf (error: the first one finish_bucket returned), restore
        every bucket's state and apply the on_nonfinite policy."""
        for b in self.buckets:
            b.handle = None
        if error is not None:
            self._restore()
            return self._nonfinite(error)
        for b in self.buckets:
            b.method.commit(b.state)
        self._end_step(advance=True)
        return Outcome()

    def _nonfinite(self, error) -> Outcome:
        self.comm.counters = Counters()
        self._end_step(advance=False)
        if self.on_nonfinite == "raise":
            return Outcome(error=error)
        for b in self.buckets:
            b.flat.fill_(float("nan"))
        self.totals.extra["skipped_steps"] = self.totals.extra.get("skipped_steps", 0) + 1
        return Outcome(skipped=True)

    def _restore(self):
        """Every bucket launched this step back to its state before the step. A bucket that
        was not launched (a step that failed part way) is as it was: its backup is older."""
        for b in self.buckets:
            if not b.saved:
                continue
            for k, v in b.backup.items():
                b.state[k].copy_(v)
            b.method.rollback(b.state)        # what the method restores itself

    def drain(self) -> None:
        """After an error between launch and finish: wait for what is in flight, so that no
        collective writes into a bucket later, and restore the method state."""
        for b in self.buckets:
            if b.handle is not None:
                try:
                    b.handle.wait()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
                b.handle = None
        # the buckets whose launch began (a launch that raised part way included)
        self._restore()
        self.comm.counters = Counters()
        self._end_step(advance=False)

    def _abort_step(self):
        self._step_started = False
        self._failure = None
        for b in self.buckets:
            b.saved = False

    def _end_step(self, advance: bool) -> None:
        self._abort_step()
        if not advance:
            return
        self.last = self.comm.counters
        self.totals.add(self.last)
        self.comm.counters = Counters()
        self.step += 1

    # --- statistics -----------------------------------------------------------------------------

    def stats(self) -> dict:
        """Exact byte counts and times of the last step and of the whole run, for this rank
        (see DistributedOptimizer.compression_stats)."""
        last, tot = self.last, self.totals
        return {
            "method": self.method.describe(),
            "steps": self.step,
            "ranks": self.comm.size,
            "buckets": len(self.buckets),
            "compressed_buckets": len(self.compressed),
            "bytes_sent": last.bytes_sent,
            "bytes_received": last.bytes_received,
            "dense_fp32_bytes": last.dense_fp32_bytes,
            "compression_ratio": last.dense_fp32_bytes / max(last.bytes_sent, 1),
            "wire_bytes_sent": last.wire_bytes_sent,
            "control_bytes": last.control_bytes,
            "seconds_encode": last.seconds_encode,
            "seconds_communicate": last.seconds_communicate,
            "seconds_decode": last.seconds_decode,
            "total_bytes_sent": tot.bytes_sent,
            "total_bytes_received": tot.bytes_received,
            "total_dense_fp32_bytes": tot.dense_fp32_bytes,
            "total_wire_bytes_sent": tot.wire_bytes_sent,
            "total_control_bytes": tot.control_bytes,
            "total_seconds_encode": tot.seconds_encode,
            "total_seconds_communicate": tot.seconds_communicate,
            "total_seconds_decode": tot.seconds_decode,
            # counts some methods report (nnz_sent, dense_fallbacks, error_resets,
            # size_exchange_bytes, skipped_steps): last step under its name, whole run as
            # total_<name>
            **{k: last.extra.get(k, 0) for k in tot.extra},
            **{f"total_{k}": v for k, v in tot.extra.items()},
        }

    # --- checkpoints ----------------------------------------------------------------------------

    def state_section(self) -> dict:
        """This rank's method state, for the front end's state_dict()."""
        return {"format": 1, "method": self.method.describe(), "rank": self.comm.rank,
                "world_size": self.comm.size, "step": self.step, "seed": self.seed,
                "slices": self._slices(),
                "buckets": [{k: v.clone() for k, v in b.state.items()} for b in self.buckets]}

    def load_section(self, section: dict | None) -> None:
        """Local, as Horovod's load_state_dict is: what needs the other ranks (world size,
        rank, method, model) is checked here and reported to every rank at the next step's
        control exchange, where every rank raises the same error."""
        if section is None:
            if any(b.state for b in self.buckets):
                warnings.warn("hvd_signsgd: the checkpoint has no hvd_signsgd section (saved "
                              "from a plain optimizer?); the method state (error memory, "
                              "momentum) starts fresh", stacklevel=3)
            return
        problem = self._check_section(section)
        if problem is None:
            for b, saved in zip(self.buckets, section["buckets"]):
                for k, v in saved.items():
                    b.state[k].copy_(v)
        self._loaded = (section["step"], problem)
        self.step = section["step"]

    def _slices(self):
        """Hierarchical exchange: (ranks per host, this rank's slice): the state holds only
        that slice of each bucket. None: the whole bucket."""
        if self.exchange.mode == "hierarchical" and self.exchange.local is not None:
            return (self.exchange.local.size, self.exchange.local.rank)
        return None

    def _check_section(self, s) -> str | None:
        stateful = any(b.state for b in self.buckets)
        if stateful and s.get("slices") != self._slices():
            def what(x):
                return (f"slice {x[1]} of {x[0]} (exchange='hierarchical')" if x
                        else "whole buckets")
            return (f"the method state was saved as {what(s.get('slices'))} and this optimizer "
                    f"keeps {what(self._slices())}; resume with the exchange and ranks per host "
                    f"of the job that saved it")
        if s["method"] != self.method.describe():
            return f"the state is for {s['method']}, this optimizer runs {self.method.describe()}"
        if stateful and s["world_size"] != self.comm.size:
            return (f"the checkpoint was written by a job of {s['world_size']} ranks and this "
                    f"job has {self.comm.size}; error memory and momentum are per rank and "
                    f"cannot be re-sharded exactly. Resume with {s['world_size']} ranks.")
        if stateful and s["rank"] != self.comm.rank:
            return (f"this rank loaded the state saved by rank {s['rank']}; load the file "
                    f"this rank saved (one file per rank)")
        shapes = [{k: tuple(v.shape) for k, v in saved.items()} for saved in s["buckets"]]
        mine = [{k: tuple(v.shape) for k, v in b.state.items()} for b in self.buckets]
        if shapes != mine:
            return "the method state does not match this model's buckets (another model?)"
        return None


def _backup_for(b: Bucket) -> dict:
    """Spare copies of the state the engine restores after a failed step (the method restores
    its self_restored_keys itself)."""
    return {k: torch.empty_like(b.state[k]) for k in _backed_up(b)}


def _backed_up(b: Bucket) -> list:
    return [k for k in b.state if k not in b.method.self_restored_keys]


def _first_difference(views) -> str:
    ref = views[0]
    for r, v in enumerate(views[1:], start=1):
        if v[2] != ref[2]:
            for i, (a, b) in enumerate(itertools.zip_longest(ref[2], v[2])):
                if a != b:
                    return (f"Rank 0 has bucket {i} = {a}, rank {r} has {b}. Every rank must "
                            f"build the same model and pass the same method and options.")
        if v[3][:2] == ref[3][:2] and v[3] != ref[3]:
            return (f"Rank 0 has the options {ref[3][2]}, rank {r} has {v[3][2]}. Pass the "
                    f"same options (and environment: HVD_SIGNSGD_LOCAL_SIZE) on every rank.")
        if v[3] != ref[3]:
            return (f"Rank 0 has (seed, start_step, options) = {ref[3]}, rank {r} has {v[3]}. "
                    f"Pass the same seed on every rank (not seed + rank: the method derives "
                    f"per-rank streams itself).")
    return "The ranks differ in an option."


__all__ = ["Engine", "Bucket", "Outcome", "StepError", "layout_digest"]
