"""hvd_signsgd.DistributedOptimizer: Horovod's DistributedOptimizer, with compressed exchange.

This is the Horovod front end of the engine (engine.py). The data path of one step, top to
bottom:

1. backward: a post-accumulate-grad hook per parameter counts backward passes (Horovod's
   `backward_passes_per_step`); when every parameter of a bucket has its gradient, the bucket
   is handed to a launch worker thread (overlap=True), so that encoding and communication
   overlap the rest of backward:
       the step's control exchange (engine.begin_step, once per step)
       -> the gradients are in the bucket's flat float32 buffer: each float32 p.grad is a view
          of it after its first step ("gradient as bucket view"); other gradients are copied in
       -> engine.launch: method.prepare / method.encode, then the collective
   A bucket whose launch blocks on the other ranks (engine.launch_blocks: the hierarchical
   host reduce, threshold's size exchange) leaves in bucket order, after the earlier ones.
2. synchronize(): buckets whose gradients never arrived (unused parameters, frozen layers) are
   launched with zeros, which do not vote (sign(0) = 0), as Horovod allreduces zeros for them;
   then engine.finish aggregates every bucket (identical on every rank) into its buffer, which is
   p.grad (gradients that are not views get the result copied). Sparse gradients travel apart
   (see _SparseExchange).
3. step(): the wrapped optimizer applies the aggregated gradients (learning rate, weight decay
   and, for methods without momentum of their own, momentum).

Horovod's idioms that call step() or load_state_dict() on some ranks only are local here:
`hvd.broadcast_optimizer_state` initialises state by calling step() on zero gradients without a
backward pass; such a step exchanges nothing and changes no parameter (see step()).
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import horovod.torch as hvd
import torch

from .codecs import gap_index
from .communicator import HorovodCommunicator
from .engine import Engine
from .exchange import EXCHANGES, exchange_problem
from .methods import Method, NoCompression, make_method

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class _Slot:
    """The front end's side of a bucket: its parameters and their views into the buffer."""
    params: list
    views: list
    gaps: torch.Tensor | None   # positions of the alignment gaps (kept 0), or None
    ready: int = 0
    launched: bool = False


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


class _SparseExchange:
    """Sparse gradients (nn.Embedding(sparse=True)) without sparse_as_dense: as in Horovod, each
    rank's (indices, values) are allgathered and the result is their sparse sum (mean for
    op=Average) over the voting ranks, so rows no rank touched stay untouched. One allgather a
    step carries every sparse gradient of the rank (identified by position in the wrapper).

    Which steps have it must be the same on every rank: a rank announces that it has met a
    sparse gradient in the step's control record, and from the next step on every rank takes
    part (a step in which only some ranks know densifies the sparse gradients into the bucket,
    which gives the same result through the zero rule)."""

    def __init__(self, comm, name, params):
        self.comm, self.name = comm, name
        self.index = {p: i for i, p in enumerate(params)}
        self.grads = {}
        self.handle = None

    def start(self, divisor: int) -> None:
        parts = []
        for p, g in self.grads.items():
            idx = g.indices().to(torch.int64).contiguous()
            vals = g.values().to(torch.float32).contiguous()
            head = torch.tensor([self.index[p], idx.shape[0], idx.shape[1]], dtype=torch.int64)
            parts += [head.view(torch.uint8), idx.view(-1).view(torch.uint8),
                      vals.view(-1).view(torch.uint8)]
        parts.append(torch.tensor([-1], dtype=torch.int64).view(torch.uint8))   # end of rank
        self.divisor = divisor
        self.handle = self.comm.allgather(torch.cat(parts), f"{self.name}.sparse",
                                          size_exchange=True)

    def finish(self, params) -> dict:
        """{parameter: its summed sparse gradient} for every parameter any rank sent."""
        buf = self.handle.wait()
        self.handle, self.grads = None, {}
        pieces, pos = {}, 0
        while pos < buf.numel():
            (i,) = buf[pos:pos + 8].view(torch.int64).tolist()
            pos += 8
            if i < 0:
                continue
            sdim, nnz = buf[pos:pos + 16].view(torch.int64).tolist()
            pos += 16
            idx = buf[pos:pos + 8 * sdim * nnz].view(torch.int64).view(sdim, nnz)
            pos += 8 * sdim * nnz
            p = params[i]
            row = p.shape[sdim:]
            count = nnz * int(torch.Size(row).numel())
            vals = buf[pos:pos + 4 * count].view(torch.float32).view(nnz, *row)
            pos += 4 * count
            pieces.setdefault(p, []).append((idx, vals))
        out = {}
        for p, parts in pieces.items():
            idx = torch.cat([a for a, _ in parts], dim=1)
            vals = torch.cat([b for _, b in parts]).div_(self.divisor).to(p.dtype)
            out[p] = torch.sparse_coo_tensor(idx, vals, p.shape)
        return out


class _CompressedOptimizer(torch.optim.Optimizer):
    """Mixed into the user's optimizer class by DistributedOptimizer (see its docstring)."""

    def _hvd_init(self, base_cls, named_parameters, method, problem, backward_passes_per_step,
                  op, gradient_predivide_factor, groups, sparse_as_dense, process_set,
                  bucket_cap_mb, min_compress_numel, start_step, seed, log_every, on_nonfinite,
                  overlap, exchange="auto"):
        self._base_cls = base_cls
        self._comm = HorovodCommunicator(process_set)
        self.process_set = process_set
        self.backward_passes_per_step = backward_passes_per_step
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.sparse_as_dense = sparse_as_dense
        self.method = method
        self.start_step = start_step
        self.seed = seed
        self.log_every = log_every
        self._synchronized = False
        self._should_synchronize = True
        self._launched = False
        self._backward_seen = False
        self._pending_load = None       # (section,): load_state_dict() while a step ran
        self._skip_step = False
        self._engine = Engine(self._comm, method or NoCompression(), seed=seed,
                              start_step=start_step, average=op == hvd.Average,
                              predivide=gradient_predivide_factor, on_nonfinite=on_nonfinite,
                              exchange=exchange)
        named, param_problem = self._check_parameters(named_parameters)
        problem = problem or param_problem or (method.check_optimizer(self.param_groups)
                                               if method is not None else None)
        self._slots = {}
        if not problem:
            self._build(named, groups, bucket_cap_mb, min_compress_numel)
        if self._comm.included:
            self._engine.validate(problem, options=(backward_passes_per_step,))
        elif problem:
            raise ValueError(f"hvd_signsgd: {problem}")
        self._names = {p: n for n, p in named}
        self._bucket_of = {p: b for b in self._engine.buckets for p in self._slots[b.index].params}
        self._delay = {p: backward_passes_per_step for p in self._bucket_of}
        self._sparse = _SparseExchange(self._comm, self._engine.prefix,
                                       [p for p, _ in self._bucket_of.items()])
        # the buckets whose launch waits for the other ranks, in the order they must leave
        self._in_order = [b for b in self._engine.buckets if self._engine.launch_blocks(b)]
        self._held = set()     # indices of such buckets ready but waiting for earlier ones
        self._hooks = []
        self._worker, self._inflight = None, []
        if self._comm.included:
            self._hooks = [p.register_post_accumulate_grad_hook(self._hook)
                           for p in self._bucket_of]
            if overlap and self._comm.size > 1:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="hvd_signsgd-launch")

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

    def _build(self, named, groups, bucket_cap_mb, min_compress_numel):
        # Reverse registration order approximates the order gradients arrive in backward.
        ordered = list(reversed(named))
        small = [(n, p) for n, p in ordered if p.numel() < min_compress_numel]
        large = [(n, p) for n, p in ordered if p.numel() >= min_compress_numel]
        chunks = [(c, None) for c in _group(large, groups, bucket_cap_mb) if c]
        if small:
            chunks.append((small, self._engine.dense))
        self._engine.build([([n for n, _ in c], [p.numel() for _, p in c], m)
                            for c, m in chunks])
        for b, (chunk, _) in zip(self._engine.buckets, chunks):
            params = [p for _, p in chunk]
            self._slots[b.index] = _Slot(
                params, [b.flat[o:o + s].view(p.shape)
                         for p, o, s in zip(params, b.layout.offsets, b.layout.sizes)],
                gap_index(b.layout))

    @property
    def _buckets(self):
        return self._engine.buckets

    # --- step path ---------------------------------------------------------------------------

    def _hook(self, p):
        if self._delay[p] <= 0:
            raise AssertionError("Gradients were computed more than backward_passes_per_step "
                                 "times before step(); increase backward_passes_per_step.")
        self._backward_seen = True
        self._delay[p] -= 1
        if self._delay[p] > 0:
            return
        b = self._bucket_of[p]
        slot = self._slots[b.index]
        slot.ready += 1
        if slot.ready < len(slot.params):
            return
        engine = self._engine
        if b.method.model_scope and engine.step >= engine.start_step:
            group = engine.compressed
            if all(self._slots[c.index].ready == len(self._slots[c.index].params)
                   for c in group):
                self._launch(group)
        elif engine.launch_blocks(b):
            self._launch_in_order(b)
        else:
            self._launch([b])

    def _launch_in_order(self, b):
        """Bucket b's launch waits for the other ranks (engine.launch_blocks): such buckets
        leave in bucket order, since the order backward readies them in can differ between
        ranks (control flow that differs by rank), and two ranks waiting in different
        buckets would wait for each other forever. b waits here for the earlier ones; what
        backward never readies, synchronize() launches, in bucket order too."""
        self._held.add(b.index)
        for c in self._in_order:
            if self._slots[c.index].launched:
                continue
            if c.index not in self._held:
                return
            self._held.discard(c.index)
            self._launch([c])

    def _launch(self, buckets):
        """Start the buckets' exchange: on the launch worker when overlap is on, so that
        encoding runs while backward computes the next gradients; else here, in the hook.
        A worker's error is raised by synchronize()."""
        for b in buckets:
            self._slots[b.index].launched = True
        self._launched = True
        if self._worker is not None:
            self._inflight.append(self._worker.submit(self._launch_now, buckets))
            return
        try:
            self._launch_now(buckets)
        except BaseException:
            self._engine.drain()
            self._end_exchange()
            raise

    def _launch_now(self, buckets):
        """The step's control exchange (first launch only), then gradients into the buckets,
        then encode and send."""
        self._engine.begin_step()
        for b in buckets:
            self._collect(b)
        self._engine.launch(buckets)

    def _wait_launches(self):
        errors = []
        for f in self._inflight:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - every launch must end before drain
                errors.append(e)
        self._inflight = []
        if errors:
            raise errors[0]

    def _collect(self, b):
        """Make sure every gradient of the bucket is in b.flat. A float32 CPU p.grad that is
        already its view holds the accumulated gradient: nothing to do. Any other (the first
        step, after zero_grad(set_to_none=True), another dtype or device) is copied in, and
        float32 CPU gradients are replaced by their view, so that the next backward
        accumulates into the bucket and the result needs no copy back. A missing gradient is
        zeros, which do not vote. A sparse gradient goes to the sparse exchange (its segment
        stays zero) once every rank knows about sparse gradients, else it is densified."""
        slot = self._slots[b.index]
        for p, view in zip(slot.params, slot.views):
            g = p.grad
            if g is not None and not g.is_sparse and g.data_ptr() == view.data_ptr():
                continue
            if g is None:
                view.zero_()
                p.grad = view if p.dtype == torch.float32 and p.device.type == "cpu" \
                    else torch.zeros_like(p)
            elif g.is_sparse:
                if not self.sparse_as_dense:
                    self._engine.sparse_seen = True
                if self._engine.sparse_mode and not self.sparse_as_dense:
                    view.zero_()
                    self._sparse.grads[p] = g.coalesce()
                else:
                    view.copy_(g.to_dense())
            else:
                view.copy_(g)
                if p.dtype == torch.float32 and p.device.type == "cpu":
                    p.grad = view

    def synchronize(self):
        """Finish every bucket's exchange and write the aggregated gradients into p.grad."""
        if not self._comm.included:
            self._synchronized = True
            return
        if self._synchronized and not self._backward_seen:
            warnings.warn("optimizer.synchronize() called twice in one step; the gradients "
                          "are already exchanged, nothing is done", stacklevel=2)
            return
        engine = self._engine
        if not engine.buckets:
            self._synchronized = True
            return
        try:
            self._wait_launches()
            pending = [b for b in engine.buckets if not self._slots[b.index].launched]
            model_scope = [b for b in pending if b.method.model_scope and
                           engine.step >= engine.start_step]
            for b in pending:
                if b not in model_scope:
                    self._launch_now([b])
            if model_scope:
                self._launch_now(model_scope)
            if engine.sparse_mode:
                self._sparse.start(len(engine.voters) if engine.average else 1)
            sparse_ranks = engine.sparse_mode
            outcome = engine.finish()
            sparse = self._sparse.finish(list(self._bucket_of)) if sparse_ranks else {}
        except BaseException:
            engine.drain()
            self._end_exchange()
            raise
        self._end_exchange()
        if outcome.error is not None:
            raise outcome.error
        self._write_results(sparse)
        self._skip_step = outcome.skipped
        self._synchronized = True
        self._log()

    def _write_results(self, sparse):
        for b in self._engine.buckets:
            slot = self._slots[b.index]
            if slot.gaps is not None:
                b.flat.index_fill_(0, slot.gaps, 0.0)
            for p, view in zip(slot.params, slot.views):
                g = p.grad
                if p in sparse:
                    p.grad = sparse[p]
                elif g.is_sparse:   # densified: hand the optimizer a sparse gradient again
                    p.grad = view.to(p.dtype).to_sparse()
                elif g.data_ptr() != view.data_ptr():
                    g.copy_(view)

    def _end_exchange(self):
        """Ready for the next step's backward passes, whether this one succeeded or not."""
        for slot in self._slots.values():
            slot.ready, slot.launched = 0, False
        self._held = set()
        self._reset_delays()
        self._launched = False
        self._backward_seen = False
        if self._pending_load is not None:      # load_state_dict() during this step
            (ours,), self._pending_load = self._pending_load, None
            self._engine.load_section(ours)

    def _reset_delays(self):
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step

    def _log(self):
        step = self._engine.step
        if self.log_every and step % self.log_every == 0 and self._comm.rank == 0:
            s = self.compression_stats()
            print(f"[hvd_signsgd] step {step} {s['method']}: sent {s['bytes_sent']} B "
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
        """Exchange (unless synchronize() already did), then the wrapped optimizer's step.

        A step with no backward pass since the last one and only zero (or no) gradients is
        Horovod's state initialisation (hvd.broadcast_optimizer_state calls step() that way,
        on the ranks whose optimizer state is empty only): it exchanges nothing, and the
        wrapped optimizer initialises its state with the parameters restored, so parameters,
        the method's state and the step counter stay exactly as they were."""
        if self._should_synchronize and self._comm.included:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "after optimizer.synchronize(); the gradients were already "
                              "exchanged, so this step does not exchange again", stacklevel=2)
            elif not self._backward_seen and not self._launched and self._zero_gradients():
                return self._initialise_state(closure)
            else:
                self.synchronize()
        self._synchronized = False
        if self._skip_step:        # on_nonfinite="skip": nothing is applied
            self._skip_step = False
            return None
        return self._base_cls.step(self, closure)

    def _zero_gradients(self) -> bool:
        return all(p.grad is None or (not p.grad.is_sparse and not p.grad.any())
                   for p in self._bucket_of)

    def _initialise_state(self, closure):
        saved = [p.detach().clone() for p in self._bucket_of]
        result = self._base_cls.step(self, closure)
        with torch.no_grad():
            for p, s in zip(self._bucket_of, saved):
                p.copy_(s)
        return result

    def zero_grad(self, set_to_none: bool = True):
        if self._launched:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but "
                                 "before optimizer.step() or optimizer.synchronize(); this "
                                 "would race with the gradient exchange.")
        self._synchronized = False      # new gradients follow: a new step's exchange
        return self._base_cls.zero_grad(self, set_to_none)

    def set_backward_passes_per_step(self, passes: int):
        self.backward_passes_per_step = passes
        self._reset_delays()

    def join(self) -> int:
        """For uneven data: a rank that has run out of batches calls optimizer.join() instead of
        another step. Until every rank has joined, it takes part in each step of the others
        with an empty payload (it votes nothing and adds nothing; means are over the ranks
        that still train) and applies the same update, so its parameters stay identical.
        Returns when every rank has joined; the return value is the number of steps it took
        part in. Horovod's hvd.join() cannot carry compressed exchanges (allgathers): with a
        compressed method it is reported as an error on the other ranks."""
        if not self._comm.included:
            return 0
        engine = self._engine
        engine.join()
        steps = 0
        while True:
            try:
                voters = engine.begin_step()
                if not voters:
                    engine.drain()
                    return steps
                engine.launch([b for b in engine.buckets])
                if engine.sparse_mode:
                    self._sparse.start(len(voters) if engine.average else 1)
                outcome = engine.finish()
                sparse = self._sparse.finish(list(self._bucket_of)) if engine.sparse_mode \
                    else {}
            except BaseException:
                engine.drain()
                raise
            finally:
                self._end_exchange()
            steps += 1
            if outcome.error is None and not outcome.skipped:
                for p in self._bucket_of:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                self._write_results(sparse)
                self._base_cls.step(self)

    # --- statistics ---------------------------------------------------------------------------

    def compression_stats(self) -> dict:
        """Exact byte counts and times of the last step and of the whole run, for this rank.

        bytes_sent / bytes_received: what this rank handed to / received from the collectives
        in the last step (payloads with headers, or dense tensors); compression_ratio: a
        float32 allreduce of the same gradients (4 bytes per coordinate) over bytes_sent.
        wire_bytes_sent models what a ring algorithm puts on this rank's link. control_bytes:
        the step's control record (8 bytes x 4 fields x ranks), not included in bytes_sent.
        """
        return self._engine.stats()

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self):
        """The wrapped optimizer's state plus this rank's method state (error memory, momentum,
        step counter; the random streams are a pure function of seed, rank and step).
        Save one file per rank to resume the method state exactly; a file saved on rank 0
        alone resumes rank 0's method state, and the others start theirs fresh."""
        sd = self._base_cls.state_dict(self)
        sd["hvd_signsgd"] = self._engine.state_section()
        return sd

    def load_state_dict(self, state_dict):
        """Local, as in Horovod: Horovod's resume idiom (rank 0 loads, then
        hvd.broadcast_optimizer_state) works. What needs the other ranks (world size, rank,
        method, model) is checked at the next step, where every rank raises the same error.
        A plain optimizer's state (no hvd_signsgd section) loads with the method state
        starting fresh. Between backward() and step() the method state is loaded once the
        step's exchange has ended (it was encoded from the state before), so the loaded state
        is the one step() keeps; nothing is communicated here."""
        state_dict = dict(state_dict)
        ours = state_dict.pop("hvd_signsgd", None)
        self._base_cls.load_state_dict(self, state_dict)
        if self._engine.buckets and (self._launched or self._backward_seen):
            self._pending_load = (ours,)        # applied by _end_exchange
            return
        self._engine.load_section(ours)
        self._reset_delays()


def _group(large, groups, bucket_cap_mb):
    """The compressed tensors in buckets: Horovod's groups (a list of parameter lists, or a
    number of groups), else consecutive runs of at most bucket_cap_mb."""
    if isinstance(groups, list):
        member = {id(p): i for i, grp in enumerate(groups) for p in grp}
        chunks = [[x for x in large if member.get(id(x[1])) == i] for i in range(len(groups))]
        return chunks + [[x] for x in large if id(x[1]) not in member]
    if isinstance(groups, int) and groups > 0:
        k, m = divmod(len(large), groups)
        bounds = [i * k + min(i, m) for i in range(groups + 1)]
        return [large[bounds[i]:bounds[i + 1]] for i in range(groups)]
    cap = int(bucket_cap_mb * 2**20 / 4)
    chunks, cur, cur_n = [], [], 0
    for x in large:
        if cur and cur_n + x[1].numel() > cap:
            chunks.append(cur)
            cur, cur_n = [], 0
        cur.append(x)
        cur_n += x[1].numel()
    chunks.append(cur)
    return chunks


def DistributedOptimizer(optimizer, named_parameters=None, compression=None,
                         backward_passes_per_step=1, op=hvd.Average,
                         gradient_predivide_factor=1.0, num_groups=0, groups=None,
                         sparse_as_dense=False, process_set=hvd.global_process_set, *,
                         method=None, bucket_cap_mb=25.0, min_compress_numel=128,
                         start_step=0, seed=0, log_every=0, on_nonfinite="raise",
                         overlap=True, exchange="auto", **method_options):
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
            and schedule start at step start_step. For methods whose update is a vote or a
            mean of signs, warm-up updates are scaled per tensor to a mean |u_i| of 1, the size
            of a vote, so that lr means the same before and after.
        seed: global seed of the stochastic methods' random streams; the same on every rank
            (checked: the per-rank streams are derived from it).
        log_every: rank 0 prints compression_stats() every that many steps (0: never).
        on_nonfinite: "raise" (default): a NaN/Inf gradient on any rank raises
            NonFiniteGradientError on every rank; "skip": every gradient of that step becomes
            NaN, so that torch.amp.GradScaler skips it (Horovod's AMP pattern), and step()
            applies nothing. Either way the method state is exactly as before the step.
        overlap: encode and start each bucket's exchange on a worker thread as soon as its
            gradients are ready, while backward computes the next ones (the kernels release
            the GIL); False does it inside the backward hook. Results are identical.
        exchange: how compressed buckets travel (hvd_signsgd.exchange, ALGORITHMS.md section
            11). "allgather": every rank receives every rank's payload, (n-1) payloads per
            rank. "alltoall": the sharded exchange, about 2(n-1)/n payloads per rank whatever
            n, for methods aggregated by a majority vote or a mean of signs (signsgd, signum,
            stochastic_sign, ssdm with aggregation "majority"/"mean"); the result is
            bit-identical to "allgather". "auto" (default): per bucket, the cheaper of the two
            by a cost model of n and the bucket's length; other methods keep their collective,
            except that a topk / threshold bucket whose ranks' pairs add up to more than 8
            bytes per element goes as a float32 allreduce of the scattered pairs (identical
            on every rank, not bit-identical to the pairs' allgather).
            "hierarchical": the ranks of a host first sum their float32 gradients (a local
            allreduce), each local rank compresses its 1/L slice of the host mean and
            exchanges it with its peers on the other hosts, and the slices are shared on the
            host: each host sends one compressed payload per bucket instead of L. A vote is
            then a vote of hosts, and error memory / momentum are per slice (checkpoints say
            so). Needs Horovod dynamic process sets (HOROVOD_DYNAMIC_PROCESS_SETS=1 or
            hvd.init(process_sets="dynamic")) and the same number of ranks on every host;
            HVD_SIGNSGD_LOCAL_SIZE=L groups blocks of L consecutive ranks as hosts instead of
            Horovod's. Refuses methods with a whole-model norm and optimizer.join().
            The same on every rank (checked).

    Methods with momentum of their own (signum, ssdm) expect a wrapped optimizer without
    momentum (plain SGD); weight decay of the wrapped optimizer is applied after aggregation.
    Save state_dict() on every rank (one file per rank) to resume the method state exactly;
    load_state_dict() is local, so Horovod's rank-0 resume idiom works too.
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
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', not {on_nonfinite!r}")
        resolved = _resolve_method(method, compression, method_options)
        bad_exchange = exchange_problem(resolved, exchange)
        if bad_exchange:
            raise ValueError(bad_exchange)
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
                      start_step, seed, log_every, on_nonfinite, overlap,
                      exchange if exchange in EXCHANGES else "auto")
    return wrapped
