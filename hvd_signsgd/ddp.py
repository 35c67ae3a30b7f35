"""hvd_signsgd.ddp: the same methods as a torch DistributedDataParallel communication hook.

    import hvd_signsgd.ddp
    model = torch.nn.parallel.DistributedDataParallel(model)
    state = hvd_signsgd.ddp.State(method="signum", optimizer=optimizer)
    model.register_comm_hook(state, hvd_signsgd.ddp.hook)

This is the DDP front end of the engine (engine.py); the Horovod one is optimizer.py. DDP hands
the hook one bucket of gradients at a time (its own buckets: `bucket_cap_mb`, in the order they
become ready) and expects a future of the bucket's averaged gradient. Per DDP bucket:

1. the first bucket of a step runs the engine's control exchange (engine.begin_step: step
   counter, loaded checkpoints; one small blocking all_reduce per step);
2. the bucket's gradients are copied into one or two engine buckets: tensors of at least
   `min_compress_numel` elements go to the method, smaller ones (biases, norms) to a float32
   all_reduce, as with the Horovod front end; both start their collective at once
   (torch.distributed, asynchronous: see communicator.TorchDistCommunicator);
3. the returned future is chained on those collectives: its callback aggregates (the vote, the
   mean of scaled signs, ...) into the DDP bucket's buffer, which DDP then writes to p.grad;
4. the last bucket's future also closes the step (engine.end_step: the step counter, the
   statistics of compression_stats(), the NaN/Inf policy).

The wrapped optimizer then applies the aggregate as it would DDP's mean gradient (learning rate,
weight decay, and momentum for methods without their own).

DDP's buckets. DDP rebuilds its buckets once, after the first iteration (in gradient-ready
order), so the hook's bucket indices mean other parameters from then on. The method state
(error memory, momentum) is therefore kept per parameter, not per index: when bucket i arrives
with other parameters than last time, the engine buckets from i on are rebuilt and each
parameter's state moves with it. Parameters are identified by their order of first appearance
(bucket 0 of the first step first), which is also how a checkpoint names them.

Methods. Every method of hvd_signsgd.METHODS works, with one difference: stochastic_sign and ssdm
default to norm="bucket" here (each DDP bucket normalised on its own), because a hook cannot
wait for every bucket to take a whole-model norm; norm="model" is refused with a clear error.
DDP's join() (uneven inputs) is not supported.

NaN/Inf (on_nonfinite): a step in which any rank's gradient is not finite restores every
bucket's method state on every rank, as with the Horovod front end; then "raise" raises
NonFiniteGradientError from the last bucket's future (loss.backward() raises it, wrapped by
DDP in a RuntimeError carrying its message, on every rank), and "skip" makes the gradients of
the affected buckets NaN (enough for torch.amp.GradScaler, which skips a step with any
non-finite gradient) and counts the step in compression_stats()["total_skipped_steps"]; check
`state.last_step_skipped` to skip optimizer.step() without a GradScaler.

Backends: tested with Gloo on CPU. NCCL (CUDA gradients) is written to work, the engine staging
through CPU buffers, but is NOT TESTED: the machines this was written on have no GPU.
"""
import threading
import warnings

import torch

from .codecs import Layout
from .communicator import TorchDistCommunicator
from .engine import Engine
from .exchange import EXCHANGES, exchange_problem, shardable
from .methods import Method, NoCompression, make_method

_MODEL_SCOPE = ("stochastic_sign", "ssdm")


def _resolve(method, options) -> Method:
    if isinstance(method, Method):
        m = make_method(method, **options)
    else:
        if method in _MODEL_SCOPE:
            if options.get("norm", "bucket") == "model":
                raise ValueError(
                    f"{method} with norm='model' needs every bucket before any can leave; a "
                    f"DDP communication hook sees one bucket at a time. Use norm='bucket' (the "
                    f"default in hvd_signsgd.ddp), or the Horovod front end for norm='model'.")
            options = {**options, "norm": "bucket"}
        m = make_method(method, **options)
    if m.model_scope:
        raise ValueError(f"{m.describe()} needs a whole-model norm, which a DDP hook cannot "
                         f"wait for; use norm='bucket'")
    return m


class _Part:
    """One engine bucket fed by a DDP bucket: where each of its tensors sits in both."""

    def __init__(self, bucket, ddp_offsets, sizes):
        self.bucket, self.ddp_offsets, self.sizes = bucket, ddp_offsets, sizes


class State:
    """The hook's state: one method, its per-parameter memory, statistics and checkpoints.

    method: a name of hvd_signsgd.METHODS or a Method (default "ef_signsgd"); method options as
        keyword arguments (beta=0.9, ratio=0.01, ...).
    process_group: the torch.distributed group (None: the default group); every rank of it
        must construct the State (it checks the ranks agree: a collective).
    optimizer: optional, the optimizer that applies the gradients: with it, signum and ssdm
        warn when it has momentum of its own, and ecx checks its momentum settings.
    min_compress_numel: tensors with fewer elements travel uncompressed (float32 all_reduce).
    start_step: the first start_step steps run uncompressed (warm-up), as in the Horovod
        front end.
    seed: global seed of the stochastic methods' random streams; the same on every rank.
    on_nonfinite: "raise" or "skip" (module docstring).
    exchange: how compressed buckets travel, as with the Horovod front end: "auto" (the
        default: per bucket, the cost model of hvd_signsgd.exchange picks the allgather or
        the sharded exchange from the world size and the bucket's length), "allgather", or
        "alltoall" (the sharded exchange: all_to_all_single of shards, then the owners'
        results by all_gather; for the methods aggregated by a vote or a mean of signs, and
        ef_signsgd(double_squeeze=True), which needs it). The sharded exchange's second phase
        depends on the first's result: it runs on a worker thread of the communicator, over a
        second process group of the same ranks (created by the constructor when the method
        can shard and exchange is not "allgather"), so the hook's future completes after both
        phases without DDP's thread waiting.

    Errors of the arguments (an unknown method, a bad option, different methods or options on
    different ranks) are raised by the constructor on every rank with the same message.

    Tuning: as with the Horovod front end. The sign methods (signsgd, signum) replace the
    gradient by a vote of +-1 per coordinate, so they want a learning rate of the size of an
    Adam step (1e-4 to 1e-2), not SGD's; ef_signsgd and the sparsifiers (topk, threshold,
    randomk) keep gradient units (error feedback) and take SGD's learning rate. Larger DDP
    buckets (bucket_cap_mb) mean fewer headers and collectives.

    Statistics: compression_stats() (the keys of DistributedOptimizer.compression_stats());
    the seconds_communicate it reports is the wait in the future's callback (about 0: DDP,
    not the hook, waits for the collectives) plus, on the sharded exchange, the follow-up
    worker's waits for each phase.
    """

    def __init__(self, method="ef_signsgd", process_group=None, *, optimizer=None,
                 min_compress_numel=128, start_step=0, seed=0, on_nonfinite="raise",
                 exchange="auto", **method_options):
        resolved, problem = None, None
        try:
            if on_nonfinite not in ("raise", "skip"):
                raise ValueError(f"on_nonfinite must be 'raise' or 'skip', not {on_nonfinite!r}")
            resolved = _resolve(method, method_options)
            if exchange == "hierarchical":
                raise ValueError("exchange='hierarchical' is offered by the Horovod front end "
                                 "only (hvd_signsgd.DistributedOptimizer); the DDP hook takes "
                                 "'auto', 'allgather' or 'alltoall'")
            bad_exchange = exchange_problem(resolved, exchange)
            if bad_exchange:
                raise ValueError(bad_exchange)
        except ValueError as e:
            problem = str(e)
        if resolved is not None and optimizer is not None:
            if resolved.name in ("signum", "ssdm") and \
                    any(g.get("momentum", 0) for g in optimizer.param_groups):
                warnings.warn(f"{resolved.name} keeps its own momentum before the sign; the "
                              f"wrapped optimizer's momentum is applied on top of it",
                              stacklevel=2)
            problem = problem or resolved.check_optimizer(optimizer.param_groups)
        self.method = resolved
        self.min_compress_numel = min_compress_numel
        self.comm = TorchDistCommunicator(process_group)
        # a bad one is the problem, raised by validate on every rank
        mode = exchange if exchange in EXCHANGES and exchange != "hierarchical" else "auto"
        self.engine = Engine(self.comm, resolved or NoCompression(), seed=seed,
                             start_step=start_step, on_nonfinite=on_nonfinite, exchange=mode)
        self._options = (min_compress_numel, "ddp")
        self.engine.validate(problem, options=self._options)
        if mode != "allgather" and shardable(resolved):
            # every rank agrees by now (validate): the second group for the sharded
            # exchange's second phase
            self.comm.open_follow_ups()
        self._lock = threading.RLock()
        # The futures' callbacks run on the library's threads (Gloo's two workers), and the
        # hook may block in a collective (an allgather's lengths) that those threads must
        # process: the callbacks take a lock of their own, never the hook's
        self._finishing = threading.Lock()
        self._canon = {}          # (data_ptr, shape) -> the parameter's number
        self._layout = []         # per DDP bucket index: (parameter numbers, [_Part])
        self._where = {}          # parameter number -> (engine bucket, offset) of its state
        self._futures = []        # this step's bucket futures
        self._error = None        # this step's first NonFiniteGradientError
        self.last_step_skipped = False

    # --- the hook ---------------------------------------------------------------------------

    def _hook(self, bucket):
        engine = self.engine
        with self._lock:
            if bucket.index() == 0:
                if engine.step_started:      # a step that failed: nothing of it is applied
                    engine.drain()
                self._futures, self._error = [], None
                self.last_step_skipped = False
                engine.begin_step()
            parts = self._parts(bucket)
            buf = bucket.buffer()
            for part in parts:
                b = part.bucket
                if b.layout.numel != b.layout.real_numel:
                    b.flat.zero_()      # the alignment gaps must be 0 (the last result is not)
                for o, d, s in zip(b.layout.offsets, part.ddp_offsets, part.sizes):
                    b.flat[o:o + s].copy_(buf[d:d + s])
            engine.launch([p.bucket for p in parts])
            futs = [p.bucket.handle.future() for p in parts]
        fut = torch.futures.collect_all(futs).then(lambda _: self._finish(parts, buf))
        self._futures.append(fut)
        if bucket.is_last():
            step = list(self._futures)
            fut = torch.futures.collect_all(step).then(lambda _: self._end(step, buf))
        return fut

    def _finish(self, parts, buf):
        with self._finishing:
            bad = False
            for part in parts:
                try:
                    error = self.engine.finish_bucket(part.bucket)
                except Exception:
                    self.engine.raise_own_failure()     # this rank's own, if it has one
                    raise
                if error is not None:
                    self._error, bad = self._error or error, True
            if bad:
                buf.fill_(float("nan"))
                return buf
            for part in parts:
                b = part.bucket
                for o, d, s in zip(b.layout.offsets, part.ddp_offsets, part.sizes):
                    buf[d:d + s].copy_(b.flat[o:o + s])
            return buf

    def _end(self, step, buf):
        with self._finishing:
            failed = [f for f in step if f.done() and _failed(f)]
            if failed:                       # raise the callback's own error
                failed[0].wait()
            outcome = self.engine.end_step(self._error)
            self.last_step_skipped = outcome.skipped
            if outcome.error is not None:
                raise outcome.error
            return buf

    # --- DDP buckets -> engine buckets --------------------------------------------------------

    def _key(self, p) -> int:
        return self._canon.setdefault((p.data_ptr(), tuple(p.shape)), len(self._canon))

    def _parts(self, bucket) -> list[_Part]:
        """The engine buckets of DDP bucket i, rebuilt (state moved per parameter) when DDP's
        bucket i holds other parameters than last time."""
        i = bucket.index()
        params = bucket.parameters()
        keys = tuple(self._key(p) for p in params)
        if i < len(self._layout) and self._layout[i][0] == keys:
            return self._layout[i][1]
        engine = self.engine
        del self._layout[i:]
        # keep the engine buckets of DDP buckets 0..i-1; the rest move
        engine.drop_buckets(self._layout[-1][1][-1].bucket.index + 1 if self._layout else 0)
        offsets, pos = [], 0
        for p in params:
            offsets.append(pos)
            pos += p.numel()
        dense = type(engine.method) is NoCompression
        groups = {True: [], False: []}
        for k, p, d in zip(keys, params, offsets):
            groups[dense or p.numel() >= self.min_compress_numel].append((k, p, d))
        parts = []
        for large in (True, False):
            members = groups[large]
            if not members:
                continue
            b = engine.add_bucket([f"param{k}{tuple(p.shape)}" for k, p, _ in members],
                                  [p.numel() for _, p, _ in members],
                                  None if large else engine.dense)
            self._adopt(b, [k for k, _, _ in members])
            parts.append(_Part(b, [d for _, _, d in members], [p.numel() for _, p, _ in members]))
        self._layout.append((keys, parts))
        # the same model, method and options everywhere, checked before any payload leaves
        engine.validate(None, options=self._options)
        return parts

    def _adopt(self, b, keys) -> None:
        """Move each parameter's method state from where it was into the new bucket b."""
        for j, (k, o, s) in enumerate(zip(keys, b.layout.offsets, b.layout.sizes)):
            old = self._where.get(k)
            if old is not None and old[0] is not b:
                ob, oj = old
                if ob.state.keys() != b.state.keys() or ob.layout.sizes[oj] != s:
                    raise ValueError("hvd_signsgd: the method state does not match this "
                                     "model's parameters (another model?)")
                src = ob.layout.offsets[oj]
                for name, v in b.state.items():
                    v[o:o + s].copy_(ob.state[name][src:src + s])
            self._where[k] = (b, j)

    # --- statistics and checkpoints -----------------------------------------------------------

    def compression_stats(self) -> dict:
        """Exact byte counts and times of the last step and of the whole run, for this rank:
        the keys and meanings of DistributedOptimizer.compression_stats()."""
        return self.engine.stats()

    def state_dict(self) -> dict:
        """This rank's method state (error memory, momentum, step counter) with the parameters
        it belongs to. Save one file per rank to resume exactly (the state is per rank)."""
        with self._lock:
            engine = self.engine
            section = engine.state_section()
            small = [b.method is engine.dense and engine.method is not engine.dense
                     for b in engine.buckets]
            section["parameters"] = [(self._keys(b), list(b.layout.sizes), d)
                                     for b, d in zip(engine.buckets, small)]
            return section

    def _keys(self, b) -> list[int]:
        return [k for k, _ in sorted(((k, j) for k, (bb, j) in self._where.items() if bb is b),
                                     key=lambda kj: kj[1])]

    def load_state_dict(self, state_dict: dict) -> None:
        """Local, as the Horovod front end's: what needs the other ranks (world size, rank,
        method) is checked at the next step's control exchange, where every rank raises the
        same error. Call it before the first step after the DDP model is built, or between
        steps."""
        with self._lock:
            engine = self.engine
            section = dict(state_dict)
            layout = section.pop("parameters")
            if not self._layout:
                # no step yet: hold the state in the saved buckets; the first step moves it
                # into DDP's buckets parameter by parameter
                engine.drop_buckets(0)
                self._where = {}
                for keys, sizes, dense in layout:
                    b = engine.add_bucket([f"param{k}" for k in keys], sizes,
                                          engine.dense if dense else None)
                    for j, k in enumerate(keys):
                        self._where[k] = (b, j)
            else:
                section["buckets"] = self._to_current(layout, section["buckets"])
            engine.load_section(section)

    def _to_current(self, layout, saved) -> list:
        """The saved per-bucket state rearranged into the current buckets; [] (which the
        engine reports as a mismatch) when the parameters do not match."""
        pieces = {}
        for (keys, sizes, _), st in zip(layout, saved):
            for k, o, s in zip(keys, Layout.for_sizes(sizes).offsets, sizes):
                pieces[k] = (s, {n: v[o:o + s] for n, v in st.items()})
        out = []
        for b in self.engine.buckets:
            new = {n: torch.zeros_like(v) for n, v in b.state.items()}
            for k, o, s in zip(self._keys(b), b.layout.offsets, b.layout.sizes):
                if k not in pieces or pieces[k][0] != s or pieces[k][1].keys() != new.keys():
                    return []
                for n, v in new.items():
                    v[o:o + s].copy_(pieces[k][1][n])
            out.append(new)
        return out


def _failed(fut) -> bool:
    try:
        fut.value()
    except Exception:  # noqa: BLE001 - only whether it failed matters here
        return True
    return False


def hook(state: State, bucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook: model.register_comm_hook(state, hvd_signsgd.ddp.hook)."""
    return state._hook(bucket)


__all__ = ["State", "hook"]
