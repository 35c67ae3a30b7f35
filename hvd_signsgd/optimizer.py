"""hvd_signsgd.DistributedOptimizer: Horovod's DistributedOptimizer, with compressed exchange.

The data path of one step, top to bottom:

1. backward: a post-accumulate-grad hook per parameter counts backward passes (Horovod's
   `backward_passes_per_step`); when every parameter of a bucket has its gradient, the bucket
   is launched at once, so communication overlaps the rest of backward:
       the gradients are in the bucket's flat float32 buffer: each float32 p.grad is a view of
       it after its first step ("gradient as bucket view"), so backward accumulated into it;
       other gradients are copied in
       -> method.prepare / method.encode (momentum, error memory, packing)
       -> communicator.allgather(payload) (or allreduce for dense methods)
2. synchronize(): buckets whose gradients never arrived (unused parameters) are launched with
   zeros, as Horovod does; then each bucket, in a fixed order, waits for its collective and
   aggregates every rank's payload (identical on every rank) into the bucket, which is p.grad
   (gradients that are not views get the result copied).
3. step(): the wrapped optimizer applies the aggregated gradients (learning rate, weight decay
   and, for methods without momentum of their own, momentum).
"""
from __future__ import annotations

import hashlib
import itertools
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import horovod.torch as hvd
import torch

from . import kernels
from .codecs import Layout
from .communicator import Communicator, Counters
from .methods import Method, NoCompression, StepContext, make_method

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_instances = itertools.count()


@dataclass
class _Bucket:
    index: int
    name: str
    params: list            # parameters in layout order
    layout: Layout
    method: Method
    offset: int             # first element in the whole model (the stochastic-sign RNG position)
    state: dict = field(default_factory=dict)
    flat: torch.Tensor = None
    views: list = None      # flat's segment for each parameter, shaped like it
    gaps: torch.Tensor = None   # positions of the alignment gaps (kept 0), or None
    ready: int = 0
    handle: object = None
    ctx: StepContext = None
    active: Method = None   # the method used this step (the dense one during warm-up)


def _resolve_method(method, compression, options) -> Method:
    """method= wins; else a compression= object from hvd_signsgd.Compression or Horovod's."""
    if method is None and compression is not None:
        method = getattr(compression, "method", None)
        if method is None:
            name = getattr(compression, "__name__", type(compression).__name__).lower()
            method = "fp16" if "fp16" in name else "none" if "none" in name else None
            if method is None:
                raise ValueError(f"unsupported compression {compression!r}: use method=... or "
                                 f"one of hvd_signsgd.Compression")
    return make_method("ef_signsgd" if method is None else method, **options)


class _CompressedOptimizer(torch.optim.Optimizer):
    """Mixed into the user's optimizer class by DistributedOptimizer (see its docstring)."""

    def _hvd_init(self, base_cls, named_parameters, method, problem, backward_passes_per_step,
                  op, gradient_predivide_factor, groups, sparse_as_dense, process_set,
                  bucket_cap_mb, min_compress_numel, start_step, seed, log_every):
        self._base_cls = base_cls
        self._comm = Communicator(process_set)
        self.process_set = process_set
        self.backward_passes_per_step = backward_passes_per_step
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.sparse_as_dense = sparse_as_dense
        self.method = method
        self.start_step = start_step
        self.seed = seed
        self.log_every = log_every
        self._step = 0
        self._synchronized = False
        self._should_synchronize = True
        self._launched = False
        self._totals = Counters()
        self._last = Counters()
        self._prefix = f"hvd_signsgd.{next(_instances)}"
        self._dense = NoCompression()

        named, param_problem = self._check_parameters(named_parameters)
        problem = problem or param_problem
        buckets = [] if problem else self._make_buckets(named, groups, bucket_cap_mb,
                                                         min_compress_numel)
        self._validate_across_ranks(problem, buckets)
        self._buckets = buckets
        self._names = {p: n for n, p in named}
        self._bucket_of = {p: b for b in buckets for p in b.params}
        self._delay = {p: backward_passes_per_step for b in buckets for p in b.params}
        self._compressed = [b for b in buckets if not isinstance(b.method, NoCompression)]
        self._hooks = []
        if process_set.included() and self._comm.size > 1:
            self._hooks = [p.register_post_accumulate_grad_hook(self._hook)
                           for b in buckets for p in b.params]

    # --- construction ----------------------------------------------------------------------

    def _check_parameters(self, named_parameters):
        """Horovod's checks, returned as a message instead of raised, so that every rank can
        learn about a problem on any rank before raising (no rank left hanging)."""
        params = [p for g in self.param_groups for p in g["params"]]
        if named_parameters is None:
            named = [(f"allreduce.noname.{i}", p) for i, p in enumerate(params)]
        else:
            named = list(named_parameters)
            if any(not isinstance(x, tuple) or len(x) != 2 for x in named):
                return [], ("named_parameters should be a sequence of (name, parameter) "
                            "tuples, usually model.named_parameters()")
        names = [n for n, _ in named]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            return [], f"parameter names in named_parameters must be unique; duplicates: {dups}"
        unnamed = {id(p) for p in params} - {id(p) for _, p in named}
        if unnamed:
            return [], (f"named_parameters was given but {len(unnamed)} parameter(s) of the "
                        f"optimizer are not named in it")
        by_id = {id(p): n for n, p in named}
        named = [(by_id[id(p)], p) for p in params if p.requires_grad]
        for n, p in named:
            if p.dtype not in _SUPPORTED_DTYPES:
                return [], (f"parameter {n} has dtype {p.dtype}; hvd_signsgd supports "
                            f"float32, float16, bfloat16 and float64 gradients")
        return named, None

    def _make_buckets(self, named, groups, bucket_cap_mb, min_compress_numel):
        # Reverse registration order approximates the order gradients arrive in backward.
        ordered = list(reversed(named))
        small = [(n, p) for n, p in ordered if p.numel() < min_compress_numel]
        large = [(n, p) for n, p in ordered if p.numel() >= min_compress_numel]
        if isinstance(groups, list):
            member = {id(p): i for i, grp in enumerate(groups) for p in grp}
            chunks = [[x for x in large if member.get(id(x[1])) == i] for i in range(len(groups))]
            chunks += [[x] for x in large if id(x[1]) not in member]
        elif isinstance(groups, int) and groups > 0:
            k, m = divmod(len(large), groups)
            bounds = [i * k + min(i, m) for i in range(groups + 1)]
            chunks = [large[bounds[i]:bounds[i + 1]] for i in range(groups)]
        else:
            cap = int(bucket_cap_mb * 2**20 / 4)
            chunks, cur, cur_n = [], [], 0
            for x in large:
                if cur and cur_n + x[1].numel() > cap:
                    chunks.append(cur)
                    cur, cur_n = [], 0
                cur.append(x)
                cur_n += x[1].numel()
            chunks.append(cur)
        specs = [(c, self.method) for c in chunks if c]
        if small:
            specs.append((small, self._dense))
        buckets, offset = [], 0
        for i, (chunk, method) in enumerate(specs):
            layout = Layout.for_sizes([p.numel() for _, p in chunk])
            flat = torch.zeros(layout.numel)
            gaps = [j for o, s in layout.segments() for j in range(o + s, (o + s + 7) // 8 * 8)
                    if j < layout.numel]
            b = _Bucket(i, f"{self._prefix}.b{i}", [p for _, p in chunk], layout, method,
                        offset, flat=flat,
                        views=[flat[o:o + s].view(p.shape)
                               for (_, p), o, s in zip(chunk, layout.offsets, layout.sizes)],
                        gaps=torch.tensor(gaps, dtype=torch.long) if gaps else None)
            b.state = method.init_state(layout)
            b.param_names = [n for n, _ in chunk]
            buckets.append(b)
            offset += layout.numel
        return buckets

    def _validate_across_ranks(self, problem, buckets):
        method = self.method.describe() if self.method is not None else None
        desc = [(b.method.describe(), [(n, tuple(p.shape), str(p.dtype))
                                       for n, p in zip(b.param_names, b.params)])
                for b in buckets]
        digest = hashlib.sha256(repr((method, desc, self.start_step,
                                      self.backward_passes_per_step, int(self.op),
                                      self.gradient_predivide_factor)).encode()).hexdigest()
        if self._comm.size == 1 or not self.process_set.included():
            views = [(problem, digest, desc)]
        else:
            views = self._comm.allgather_object((problem, digest, desc),
                                                name=f"{self._prefix}.validate")
        problems = [(r, pr) for r, (pr, _, _) in enumerate(views) if pr]
        if problems:
            raise ValueError("hvd_signsgd.DistributedOptimizer: " + "; ".join(
                f"rank {r}: {pr}" for r, pr in problems))
        if len({d for _, d, _ in views}) > 1:
            raise ValueError("hvd_signsgd.DistributedOptimizer: the ranks do not agree on the "
                             "model or the method. " + _first_difference(views))

    # --- step path ---------------------------------------------------------------------------

    def _hook(self, p):
        if self._delay[p] <= 0:
            raise AssertionError("Gradients were computed more than backward_passes_per_step "
                                 "times before step(); increase backward_passes_per_step.")
        self._delay[p] -= 1
        if self._delay[p] > 0:
            return
        b = self._bucket_of[p]
        b.ready += 1
        if b.ready < len(b.params):
            return
        if b.method.model_scope and self._step >= self.start_step:
            if all(c.ready == len(c.params) for c in self._compressed):
                self._launch(self._compressed)
        else:
            self._launch([b])

    def _collect(self, b):
        """Make sure every gradient of the bucket is in b.flat. A float32 CPU p.grad that is
        already its view holds the accumulated gradient: nothing to do. Any other (the first
        step, after zero_grad(set_to_none=True), another dtype or device, a sparse gradient)
        is copied in, and float32 CPU gradients are replaced by their view, so that the next
        backward accumulates into the bucket and the result needs no copy back."""
        for p, view in zip(b.params, b.views):
            g = p.grad
            if g is not None and not g.is_sparse and g.data_ptr() == view.data_ptr():
                continue
            if g is None:
                view.zero_()
            elif g.is_sparse:
                if not self.sparse_as_dense:
                    raise TypeError(f"parameter {self._names[p]} has a sparse gradient; pass "
                                    f"sparse_as_dense=True to send it as a dense one")
                view.copy_(g.to_dense())
            else:
                view.copy_(g)
            if p.dtype == torch.float32 and p.device.type == "cpu" and (g is None
                                                                          or not g.is_sparse):
                p.grad = view
            elif g is None:
                p.grad = torch.zeros_like(p)

    def _launch(self, buckets):
        """Encode and start the collective of each bucket (all at once for model_scope)."""
        t0 = time.perf_counter()
        for b in buckets:
            self._collect(b)
            b.active = b.method if self._step >= self.start_step else self._dense
            compressed = b.active is not self._dense
            b.ctx = StepContext(step=self._step, rank=self._comm.rank, size=self._comm.size,
                                bucket=b.name, offset=b.offset, layout=b.layout, seed=self.seed,
                                average=self.op == hvd.Average, out=b.flat,
                                nonfinite=compressed and not kernels.all_finite(b.flat))
        method = buckets[0].active
        if method.model_scope and any(b.ctx.nonfinite for b in buckets):
            for b in buckets:     # no finite whole-model norm: every bucket reports it
                b.ctx.nonfinite = True
        for b in buckets:
            b.active.prepare(b.flat, b.state, b.ctx)
        if method.model_scope:
            norm = method.combine_norms([method.norm_part(b.flat, b.state, b.ctx)
                                         for b in buckets])
            for b in buckets:
                b.ctx.model_norm = norm
        for b in buckets:
            msg = b.active.encode(b.flat, b.state, b.ctx)
            extra = self._comm.counters.extra
            for k, v in b.ctx.stats.items():      # method counts (nnz_sent, dense_fallbacks, ...)
                extra[k] = extra.get(k, 0) + v
            if b.active.collective == "allgather":
                b.handle = self._comm.allgather(msg, b.name, size_exchange=b.active.variable_size)
            else:
                f = self.gradient_predivide_factor if b.ctx.average else 1.0
                b.handle = self._comm.allreduce(msg, b.name, op=hvd.Sum, prescale_factor=1.0 / f,
                                                postscale_factor=f)
        self._launched = True
        self._comm.counters.seconds_encode += time.perf_counter() - t0

    def synchronize(self):
        """Finish every bucket's exchange and write the aggregated gradients into p.grad."""
        if not self.process_set.included() or self._comm.size == 1:
            self._synchronized = True
            return
        pending = [b for b in self._buckets if b.handle is None]
        model_scope = [b for b in pending if b.method.model_scope and self._step >= self.start_step]
        for b in pending:
            if b not in model_scope:
                self._launch([b])
        if model_scope:
            self._launch(model_scope)
        try:
            self._write_results()
        except BaseException:
            self._drain()
            raise
        finally:
            self._end_exchange()
        self._finish_step_counters()
        self._synchronized = True

    def _write_results(self):
        """Wait for each bucket in a fixed order; its aggregate becomes the gradient."""
        c = self._comm.counters
        for b in self._buckets:
            result = b.handle.wait()
            t0 = time.perf_counter()
            update = b.active.aggregate(result, b.state, b.ctx)
            if update is not b.flat:
                b.flat.copy_(update)
            if b.gaps is not None:
                b.flat.index_fill_(0, b.gaps, 0.0)
            for p, view in zip(b.params, b.views):
                g = p.grad
                if g.is_sparse:   # sparse_as_dense: hand the optimizer a sparse gradient again
                    g.zero_().add_(view.to(p.dtype).to_sparse())
                elif g.data_ptr() != view.data_ptr():
                    g.copy_(view)
            c.seconds_decode += time.perf_counter() - t0
            c.dense_fp32_bytes += 4 * b.layout.real_numel
            b.handle = None

    def _drain(self):
        """After an error in aggregate (NaN/Inf: the same error on every rank), finish the
        collectives still in flight, so that none writes into a bucket later. The gradients
        of this step are undefined, nothing is applied and its counts are dropped."""
        for b in self._buckets:
            if b.handle is not None:
                try:
                    b.handle.wait()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
        self._comm.counters = Counters()

    def _end_exchange(self):
        """Ready for the next step's backward passes, whether this one succeeded or not."""
        for b in self._buckets:
            b.handle, b.ready = None, 0
        self._reset_delays()
        self._launched = False

    def _reset_delays(self):
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step

    def _finish_step_counters(self):
        self._last = self._comm.counters
        self._totals.add(self._last)
        self._comm.counters = Counters()
        self._step += 1
        if self.log_every and self._step % self.log_every == 0 and self._comm.rank == 0:
            s = self.compression_stats()
            print(f"[hvd_signsgd] step {self._step} {s['method']}: sent {s['bytes_sent']} B "
                  f"(x{s['compression_ratio']:.1f} less than fp32), encode "
                  f"{1e3 * s['seconds_encode']:.2f} ms, comm "
                  f"{1e3 * s['seconds_communicate']:.2f} ms, decode "
                  f"{1e3 * s['seconds_decode']:.2f} ms", flush=True)

    @contextmanager
    def skip_synchronize(self):
        """Use after an explicit synchronize(), e.g. to clip gradients, as with Horovod."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "after optimizer.synchronize(); synchronizing again.",
                              stacklevel=2)
            self.synchronize()
        self._synchronized = False
        return self._base_cls.step(self, closure)

    def zero_grad(self, set_to_none: bool = True):
        if self._launched:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but "
                                 "before optimizer.step() or optimizer.synchronize(); this "
                                 "would race with the gradient exchange.")
        return self._base_cls.zero_grad(self, set_to_none)

    def set_backward_passes_per_step(self, passes: int):
        self.backward_passes_per_step = passes
        self._reset_delays()

    # --- statistics ---------------------------------------------------------------------------

    def compression_stats(self) -> dict:
        """Exact byte counts and times of the last step and of the whole run, for this rank.

        bytes_sent / bytes_received: what this rank handed to / received from the collectives
        in the last step (payloads with headers, or dense tensors); compression_ratio: a
        float32 allreduce of the same gradients (4 bytes per coordinate) over bytes_sent.
        wire_bytes_sent models what a ring algorithm puts on this rank's link.
        """
        last, tot = self._last, self._totals
        return {
            "method": self.method.describe(),
            "steps": self._step,
            "ranks": self._comm.size,
            "buckets": len(self._buckets),
            "compressed_buckets": len(self._compressed),
            "bytes_sent": last.bytes_sent,
            "bytes_received": last.bytes_received,
            "dense_fp32_bytes": last.dense_fp32_bytes,
            "compression_ratio": last.dense_fp32_bytes / max(last.bytes_sent, 1),
            "wire_bytes_sent": last.wire_bytes_sent,
            "seconds_encode": last.seconds_encode,
            "seconds_communicate": last.seconds_communicate,
            "seconds_decode": last.seconds_decode,
            "total_bytes_sent": tot.bytes_sent,
            "total_bytes_received": tot.bytes_received,
            "total_dense_fp32_bytes": tot.dense_fp32_bytes,
            "total_wire_bytes_sent": tot.wire_bytes_sent,
            "total_seconds_encode": tot.seconds_encode,
            "total_seconds_communicate": tot.seconds_communicate,
            "total_seconds_decode": tot.seconds_decode,
            # counts some methods report (e.g. nnz_sent, dense_fallbacks, error_resets,
            # size_exchange_bytes): last step under its name, whole run as total_<name>
            **{k: last.extra.get(k, 0) for k in tot.extra},
            **{f"total_{k}": v for k, v in tot.extra.items()},
        }

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self):
        """The wrapped optimizer's state plus this rank's method state (error memory, momentum,
        step counter; the random streams are a pure function of seed, rank and step).
        Save one file per rank: the method state differs between ranks."""
        sd = self._base_cls.state_dict(self)
        sd["hvd_signsgd"] = {
            "format": 1, "method": self.method.describe(), "rank": self._comm.rank,
            "world_size": self._comm.size, "step": self._step, "seed": self.seed,
            "buckets": [{k: v.clone() for k, v in b.state.items()} for b in self._buckets],
        }
        return sd

    def load_state_dict(self, state_dict):
        """Collective: call on every rank. Every rank raises the same clear error if any rank's
        state does not fit (other world size, other rank, other method or model)."""
        state_dict = dict(state_dict)
        ours = state_dict.pop("hvd_signsgd", None)
        problem = self._check_loadable(ours)
        if self._comm.size > 1 and self.process_set.included():
            problems = self._comm.allgather_object(problem, name=f"{self._prefix}.load")
        else:
            problems = [problem]
        bad = [(r, p) for r, p in enumerate(problems) if p]
        if bad:
            raise ValueError("hvd_signsgd: cannot resume: " + "; ".join(
                f"rank {r}: {p}" for r, p in bad))
        self._base_cls.load_state_dict(self, state_dict)
        if ours is not None:
            self._step = ours["step"]
            for b, saved in zip(self._buckets, ours["buckets"]):
                for k, v in saved.items():
                    b.state[k].copy_(v)
        self._reset_delays()

    def _check_loadable(self, ours):
        if ours is None:
            return None if not self._compressed else (
                "the state has no hvd_signsgd section (saved from a plain optimizer?); the "
                "error memory / momentum cannot be restored")
        if ours["world_size"] != self._comm.size:
            return (f"the checkpoint was written by a job of {ours['world_size']} ranks and this "
                    f"job has {self._comm.size}; error memory and momentum are per rank and "
                    f"cannot be re-sharded exactly. Resume with {ours['world_size']} ranks.")
        if ours["rank"] != self._comm.rank:
            return (f"this rank loaded the state saved by rank {ours['rank']}; load the file "
                    f"this rank saved (one file per rank)")
        if ours["method"] != self.method.describe():
            return (f"the state is for {ours['method']}, this optimizer runs "
                    f"{self.method.describe()}")
        shapes = [{k: tuple(v.shape) for k, v in s.items()} for s in ours["buckets"]]
        mine = [{k: tuple(v.shape) for k, v in b.state.items()} for b in self._buckets]
        if shapes != mine:
            return "the method state does not match this model's buckets (another model?)"
        return None


def _first_difference(views) -> str:
    ref = views[0][2]
    for r, (_, _, desc) in enumerate(views[1:], start=1):
        if desc != ref:
            for i, (a, b) in enumerate(itertools.zip_longest(ref, desc)):
                if a != b:
                    return (f"Rank 0 has bucket {i} = {a}, rank {r} has {b}. Every rank must "
                            f"build the same model and pass the same method and options.")
    return "The ranks differ in start_step, backward_passes_per_step or op."


def DistributedOptimizer(optimizer, named_parameters=None, compression=None,
                         backward_passes_per_step=1, op=hvd.Average,
                         gradient_predivide_factor=1.0, num_groups=0, groups=None,
                         sparse_as_dense=False, process_set=hvd.global_process_set, *,
                         method=None, bucket_cap_mb=25.0, min_compress_numel=128,
                         start_step=0, seed=0, log_every=0, **method_options):
    """Wrap a torch optimizer so that gradients are exchanged compressed.

    A drop-in for ``hvd.DistributedOptimizer``: the same arguments with the same meanings, plus

        method: "signum", "signsgd", "stochastic_sign", "ssdm", "ef_signsgd", "fp16", "none"
            (see hvd_signsgd.METHODS), or a Method instance; default "ef_signsgd". Instead of
            method=, compression= accepts hvd_signsgd.Compression.<method> or Horovod's
            Compression.none / Compression.fp16. Method options are keyword arguments
            (e.g. beta=0.9, aggregation="majority").
        bucket_cap_mb: largest flat bucket (float32 megabytes); each bucket is encoded once and
            travels in one collective.
        min_compress_numel: tensors with fewer elements travel uncompressed in one fused float32
            allreduce (biases and norms: compressing them saves little and costs accuracy).
        start_step: the first start_step steps run uncompressed (warm-up); the method's state
            starts at step start_step.
        seed: global seed of the stochastic methods' random streams.
        log_every: rank 0 prints compression_stats() every that many steps (0: never).

    Methods with momentum of their own (signum, ssdm) expect a wrapped optimizer without
    momentum (plain SGD); weight decay of the wrapped optimizer is applied after aggregation.
    Call state_dict() on every rank and save one file per rank; load_state_dict() is collective.
    """
    if num_groups and groups is None:
        groups = num_groups
    # Argument errors are not raised here but exchanged first (in _hvd_init), so that a
    # mistake on one rank stops every rank with the same message instead of leaving the
    # others waiting in a collective.
    resolved, problem = None, None
    try:
        if backward_passes_per_step <= 0:
            raise ValueError("backward_passes_per_step must be > 0")
        if op not in (hvd.Average, hvd.Sum):
            raise ValueError("hvd_signsgd supports op=hvd.Average and op=hvd.Sum; Adasum "
                             "combines full-precision gradients and has no compressed form")
        if gradient_predivide_factor != 1.0 and op != hvd.Average:
            raise ValueError("gradient_predivide_factor not supported with op != Average")
        resolved = _resolve_method(method, compression, method_options)
    except ValueError as e:
        problem = str(e)
    if resolved is not None and resolved.name in ("signum", "ssdm"):
        if any(g.get("momentum", 0) for g in optimizer.param_groups):
            warnings.warn(f"{resolved.name} keeps its own momentum before the sign; the wrapped "
                          f"optimizer's momentum is applied on top of it", stacklevel=2)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               dict(_CompressedOptimizer.__dict__))
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)   # share param_groups, state and defaults
    wrapped._hvd_init(optimizer.__class__, named_parameters, resolved, problem,
                      backward_passes_per_step, op, gradient_predivide_factor, groups,
                      sparse_as_dense, process_set, bucket_cap_mb, min_compress_numel,
                      start_step, seed, log_every)
    return wrapped
