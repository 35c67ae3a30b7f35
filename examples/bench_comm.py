"""Communication benchmark: hvd_signsgd against Horovod's own allreduce, in the same run.

Run it under MPI, one rank per (simulated) host; examples/netsim/run_bench.sh sets up the
bandwidth-limited cluster, runs this at every rate and writes the table and plots:

    mpirun -np 4 python examples/bench_comm.py --models resnet50,bert_base --out raw.json

What is timed ("sync only"): every parameter's p.grad is set (random normal, fixed seed per
rank; untimed), then the optimizer's synchronize(), which launches every exchange not yet
launched and waits for all of them. The contenders are exactly what a user gets:

    hvd_fp32, hvd_fp16   stock hvd.DistributedOptimizer (Compression.none / .fp16) on a model
                         whose parameters have the real shapes (Horovod fuses them itself)
    <method>[:k=v...]    hvd_signsgd.DistributedOptimizer(opt, named_parameters, method=<method>,
                         k=v, ...), e.g. signsgd, ssdm, ef_signsgd, none, topk:ratio=0.01;
                         exchange=... picks the exchange (signsgd:exchange=alltoall)

A method that hvd_signsgd.METHODS lacks (or that rejects its options), or an exchange that
DistributedOptimizer rejects for it, is skipped with a note.
Per contender the result holds every step's time (the slowest rank's), hvd_signsgd's own
split into encode / communicate / decode and byte counts (compression_stats()), and the bytes
each rank's network interface really sent in the timed window (/sys/class/net/<iface>), to be
compared with compression_stats()'s ring model `wire_bytes_sent`.

The contenders take turns (--rounds): a few steps of each, then a few more of each, so that
other work on a shared machine weighs on all of them alike. Each step's time is the slowest
rank's; the summary is the median with min/max over the timed steps.

The gradient's sign flips from step to step (g, -g, g, ...): error-feedback memories then stay
bounded instead of growing each step, so sparse methods (topk, threshold) send a steady amount,
as in training, and the sign methods are not affected at all. A small fresh-looking part
(a second random set times 1e-3 (1 + step mod 5)) is added: with g and -g alone, e + g would
be exactly 0 outside the last step's Top-k set every other step, a tie of millions of
coordinates that no real gradient produces.

--e2e adds full training steps (forward, backward, exchange, update) of a wide MLP, with the
exchange overlapping backward (hooks, the normal way) and without (gradients taken with
torch.autograd.grad, so no hook fires, then synchronize() launches everything at once), plus
the same steps with no exchange at all: what overlap buys.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

# The benchmark runs from a checkout: make `import hvd_signsgd` work without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Horovod would use Gloo (its own TCP rendezvous) if told to; these runs measure its MPI path.
os.environ.setdefault("HOROVOD_CONTROLLER", "mpi")
os.environ.setdefault("HOROVOD_CPU_OPERATIONS", "mpi")

import horovod.torch as hvd  # noqa: E402
import torch  # noqa: E402

DEFAULT_CONTENDERS = ("hvd_fp32,hvd_fp16,none,signsgd,signum,ssdm,ef_signsgd,"
                      "topk:ratio=0.01,topk:ratio=0.001,threshold:lam=2.576")


# --- gradient sets with real shapes, in forward (registration) order --------------------------

def resnet50_shapes() -> list[tuple[str, tuple]]:
    """torchvision's resnet50 parameters (Bottleneck blocks [3, 4, 6, 3], expansion 4),
    written out from the architecture; 25,557,032 parameters."""
    shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            pre = f"layer{layer}.{b}"
            shapes += [(f"{pre}.conv1.weight", (planes, inplanes, 1, 1)),
                       (f"{pre}.bn1.weight", (planes,)), (f"{pre}.bn1.bias", (planes,)),
                       (f"{pre}.conv2.weight", (planes, planes, 3, 3)),
                       (f"{pre}.bn2.weight", (planes,)), (f"{pre}.bn2.bias", (planes,)),
                       (f"{pre}.conv3.weight", (planes * 4, planes, 1, 1)),
                       (f"{pre}.bn3.weight", (planes * 4,)), (f"{pre}.bn3.bias", (planes * 4,))]
            if b == 0:   # projection shortcut: channel count (and stride) changes
                shapes += [(f"{pre}.downsample.0.weight", (planes * 4, inplanes, 1, 1)),
                           (f"{pre}.downsample.1.weight", (planes * 4,)),
                           (f"{pre}.downsample.1.bias", (planes * 4,))]
            inplanes = planes * 4
    shapes += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return shapes


def bert_base_shapes() -> list[tuple[str, tuple]]:
    """BERT-base uncased (HuggingFace BertModel with pooler): 12 layers, hidden 768,
    intermediate 3072, vocabulary 30522, 512 positions; 109,482,240 parameters."""
    h, inter = 768, 3072
    shapes = [("embeddings.word_embeddings.weight", (30522, h)),
              ("embeddings.position_embeddings.weight", (512, h)),
              ("embeddings.token_type_embeddings.weight", (2, h)),
              ("embeddings.LayerNorm.weight", (h,)), ("embeddings.LayerNorm.bias", (h,))]
    for i in range(12):
        pre = f"encoder.layer.{i}"
        for part in ("query", "key", "value"):
            shapes += [(f"{pre}.attention.self.{part}.weight", (h, h)),
                       (f"{pre}.attention.self.{part}.bias", (h,))]
        shapes += [(f"{pre}.attention.output.dense.weight", (h, h)),
                   (f"{pre}.attention.output.dense.bias", (h,)),
                   (f"{pre}.attention.output.LayerNorm.weight", (h,)),
                   (f"{pre}.attention.output.LayerNorm.bias", (h,)),
                   (f"{pre}.intermediate.dense.weight", (inter, h)),
                   (f"{pre}.intermediate.dense.bias", (inter,)),
                   (f"{pre}.output.dense.weight", (h, inter)),
                   (f"{pre}.output.dense.bias", (h,)),
                   (f"{pre}.output.LayerNorm.weight", (h,)),
                   (f"{pre}.output.LayerNorm.bias", (h,))]
    shapes += [("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))]
    return shapes


def tiny_shapes() -> list[tuple[str, tuple]]:
    """A small stand-in for the smoke test (about 0.6 M parameters, a few buckets' worth of
    structure: large tensors that get compressed, small ones that travel dense)."""
    return [("conv.weight", (64, 32, 3, 3)), ("conv.bias", (64,)),
            ("fc1.weight", (512, 512)), ("fc1.bias", (512,)),
            ("fc2.weight", (512, 512)), ("fc2.bias", (512,)),
            ("head.weight", (100, 512)), ("head.bias", (100,))]


MODELS = {"resnet50": resnet50_shapes, "bert_base": bert_base_shapes, "tiny": tiny_shapes}
EXPECTED_NUMEL = {"resnet50": 25_557_032, "bert_base": 109_482_240}


def model_shapes(name: str) -> list[tuple[str, tuple]]:
    """A model of MODELS, or "d=N": one tensor of N elements."""
    if name.startswith("d="):
        return [("w", (int(name[2:]),))]
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r} (have: {', '.join(MODELS)}, or d=N)")
    return MODELS[name]()


class ShapeModel(torch.nn.Module):
    """Parameters with the given shapes and no forward: enough for a DistributedOptimizer.
    The values are never read by synchronize(), so they are left uninitialised (no memory
    is touched for them)."""

    def __init__(self, shapes):
        super().__init__()
        self.names = [n for n, _ in shapes]
        self.params = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(s)) for _, s in shapes)

    def named(self, prefix: str):
        return [(f"{prefix}.{n}", p) for n, p in zip(self.names, self.params)]


class WideMLP(torch.nn.Module):
    """The end-to-end model: ~20 M parameters, most of them in three wide layers."""

    def __init__(self, d_in=1024, width=2688, depth=3, classes=1000):
        super().__init__()
        dims = [d_in] + [width] * depth
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(width, classes))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


# --- contenders ---------------------------------------------------------------------------------

@dataclass
class Contender:
    label: str
    kind: str                 # "horovod" (stock hvd.DistributedOptimizer) or "hvd_signsgd"
    method: str = ""
    options: dict = field(default_factory=dict)


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_contenders(spec: str) -> list[Contender]:
    """'hvd_fp32,signsgd,topk:ratio=0.01' -> contenders; options are method keyword args."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in ("hvd_fp32", "hvd_fp16"):
            out.append(Contender(item, "horovod", item))
            continue
        name, *opts = item.split(":")
        options = {}
        for o in opts:
            k, sep, v = o.partition("=")
            if not sep:
                raise SystemExit(f"bad contender option {o!r} in {item!r} (want key=value)")
            options[k] = _value(v)
        out.append(Contender(item, "hvd_signsgd", name, options))
    return out


def unavailable(c: Contender) -> str | None:
    """Why a contender cannot run here (None if it can); identical on every rank."""
    if c.kind == "horovod":
        return None
    import hvd_signsgd
    if c.method not in hvd_signsgd.METHODS:
        return (f"not available: hvd_signsgd.METHODS has no {c.method!r} "
                f"(has: {', '.join(hvd_signsgd.METHODS)})")
    # exchange= is DistributedOptimizer's argument, not the method's
    options = {k: v for k, v in c.options.items() if k != "exchange"}
    try:
        method = hvd_signsgd.make_method(c.method, **options)
    except ValueError as e:
        return f"not available: {e}"
    if "exchange" in c.options:
        # the check DistributedOptimizer itself makes (an exchange this version lacks, or
        # one the method cannot take)
        from hvd_signsgd.exchange import exchange_problem
        problem = exchange_problem(method, c.options["exchange"])
        if problem:
            return f"not available: DistributedOptimizer rejects it: {problem}"
    return None


def release(opt) -> weakref.ref:
    """Prepare an optimizer to be dropped; returns a weak reference to check that it was freed.

    hvd_signsgd.DistributedOptimizer registers its hooks as bound methods on the parameters:
    parameter -> hook -> optimizer -> parameter is a cycle through torch's C++ side that
    Python's garbage collector cannot break, so a dropped optimizer (with its buckets, error
    memory and momentum) is never freed. This benchmark builds one per contender and round;
    without removing the hooks, 4 ranks ran out of memory on BERT-sized buffers."""
    for handle in getattr(opt, "_hooks", None) or []:
        handle.remove()
    return weakref.ref(opt)


def make_optimizer(c: Contender, params, named, lr=0.01, momentum=0.0, bucket_cap_mb=25.0):
    base = torch.optim.SGD(params, lr=lr, momentum=momentum)
    if c.kind == "horovod":
        comp = hvd.Compression.fp16 if c.method == "hvd_fp16" else hvd.Compression.none
        return hvd.DistributedOptimizer(base, named_parameters=named, compression=comp)
    import hvd_signsgd
    return hvd_signsgd.DistributedOptimizer(base, named_parameters=named, method=c.method,
                                            bucket_cap_mb=bucket_cap_mb, **c.options)


# --- measurement helpers ------------------------------------------------------------------------

def iface_bytes(iface: str):
    """(tx, rx) bytes of this host's interface, or None when not on the simulated cluster.
    Each rank runs in its host's network namespace, whose /sys shows that namespace's links."""
    base = Path("/sys/class/net") / iface / "statistics"
    try:
        return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())
    except OSError:
        return None


def agree_max(x: float, name: str = "bench.agree") -> float:
    """Max over ranks; doubles as a barrier (small Horovod allreduce)."""
    return float(hvd.allreduce(torch.tensor([float(x)], dtype=torch.float64), op=hvd.Max,
                               name=name))


def summary(ts: list[float]) -> dict:
    s = sorted(ts)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]
    return {"median": statistics.median(s), "min": s[0], "max": s[-1],
            "p25": q(0.25), "p75": q(0.75), "n": len(s)}


def plan_steps(first_step_s: float, args) -> int:
    """Timed steps after the warm-up: up to --steps within about --budget-s seconds, at least
    --min-steps when that costs under twice the budget (slow links), and never fewer than 1."""
    fit = int(args.budget_s // max(first_step_s, 1e-9))
    if fit >= args.min_steps:
        return min(fit, args.steps)
    return args.min_steps if first_step_s * args.min_steps <= 2 * args.budget_s else max(1, fit)


def warmup_steps(first_step_s: float, args) -> int:
    """The first step is always warm-up; more only when steps are cheap (at 100 Mbit/s one
    BERT-sized step is a minute, and the first one already pays every one-off cost)."""
    return args.warmup if first_step_s < args.budget_s / 4 else 1


def profile_rows(prof, top: int = 14) -> list[dict]:
    """The functions with the most own time in a cProfile run."""
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in pstats.Stats(prof).stats.items():
        where = fn if file == "~" else f"{Path(file).parent.name}/{Path(file).name}:{line} {fn}"
        rows.append({"function": where, "calls": ncalls, "own_s": tottime, "cum_s": cumtime})
    rows.sort(key=lambda r: -r["own_s"])
    return rows[:top]


def gradient_sources(shapes, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(g, noise) per tensor, random normal, different on every rank."""
    gen = torch.Generator().manual_seed(seed * 1009 + hvd.rank())
    return [(torch.randn(s, generator=gen), torch.randn(s, generator=gen)) for _, s in shapes]


# --- sync-only benchmark ------------------------------------------------------------------------

class SyncBench:
    """One contender on one gradient set, measured in rounds.

    The machine is shared (other jobs come and go, and all "hosts" share its cores), so the
    contenders take turns: round 1 of every contender, then round 2 of every contender, and so
    on. Each contender then sees about the same mix of quiet and busy periods, which keeps the
    speed-ups fair even when absolute times drift. Each round builds the optimizer afresh (only
    one contender's buffers exist at a time: BERT-sized state for 4 ranks would not fit 9 times),
    runs one untimed warm-up step, then its share of the timed steps."""

    def __init__(self, model_name, shapes, grads, c: Contender, args):
        self.model_name, self.shapes, self.grads, self.c, self.args = (
            model_name, shapes, grads, c, args)
        self.label = c.label
        self.is_ours = c.kind == "hvd_signsgd"
        self.last_opt = None
        self.step = 0                 # steps run so far (the gradient's sign alternates)
        self.first = None             # the first step's time (slowest rank): sets the plan
        self.total = self.rounds = 0
        self.done_rounds = 0
        self.warm = 0
        self.times, self.stats = [], []
        self.tx = self.rx = 0
        self.window_s = 0.0
        self.has_iface = True
        self.profile = None
        self.info = {}

    def _one_step(self, opt, params, profiler=None):
        sign = 1.0 if self.step % 2 == 0 else -1.0
        self.step += 1
        eps = 1e-3 * (1 + self.step % 5)
        if self.is_ours:                   # a new step: synchronize() exchanges again
            opt.zero_grad(set_to_none=False)   # (Horovod's zero_grad takes no argument)
        for p, (g, noise) in zip(params, self.grads):
            torch.add(g, noise, alpha=eps, out=p.grad)   # written in place, as backward
            if sign < 0:                                   # accumulates into zeroed .grad
                p.grad.neg_()
        agree_max(0.0)                   # everyone starts together
        if profiler:
            profiler.enable()
        t0 = time.perf_counter()
        opt.synchronize()
        dt = time.perf_counter() - t0
        if profiler:
            profiler.disable()
        return dt, (opt.compression_stats() if self.is_ours else None)

    def pending(self) -> bool:
        return self.first is None or self.done_rounds < self.rounds

    def run_round(self):
        args = self.args
        model = ShapeModel(self.shapes)
        params = list(model.params)
        opt = make_optimizer(self.c, params, model.named(self.c.label),
                             bucket_cap_mb=args.bucket_cap_mb)
        for p in params:
            p.grad = torch.empty_like(p)
        if self.is_ours and not self.info:
            st = opt.compression_stats()
            self.info = {"method": st["method"], "buckets": st["buckets"]}

        dt = agree_max(self._one_step(opt, params)[0])    # warm-up of this optimizer
        if self.first is None:
            self.first = dt
            self.warm = warmup_steps(dt, args)
            self.total = plan_steps(dt, args)
            # slow steps (100 Mbit/s, BERT): one round, as a round costs a warm-up step
            cheap = dt < args.budget_s / 4
            self.rounds = max(1, min(args.rounds, self.total)) if cheap else 1
            for _ in range(1, self.warm):
                self._one_step(opt, params)
        else:
            self.warm += 1
        r = self.done_rounds
        steps = self.total // self.rounds + (1 if r < self.total % self.rounds else 0)

        agree_max(0.0)
        before, w0 = iface_bytes(args.iface), time.perf_counter()
        for _ in range(steps):
            dt, st = self._one_step(opt, params)
            self.times.append(dt)
            self.stats.append(st)
        agree_max(0.0)                   # every byte of the last step has arrived everywhere
        after = iface_bytes(args.iface)
        # how long the counters ran: Horovod's control messages flow all the time (see
        # idle_tx_bytes_per_s), which matters next to small payloads and CPU-bound steps
        self.window_s += time.perf_counter() - w0
        if before and after:
            self.tx += after[0] - before[0]
            self.rx += after[1] - before[1]
        else:
            self.has_iface = False
        self.done_rounds += 1
        if self.done_rounds == self.rounds and self.c.method in args.profile.split(","):
            # one more step under cProfile (the main thread: the optimizer's side, not
            # Horovod's background thread), outside the timed and counted window
            prof = cProfile.Profile()
            dt, _ = self._one_step(opt, params, prof)
            self.profile = {"step_s": dt, "top": profile_rows(prof)}
        self.last_opt = release(opt)

    def result(self) -> dict:
        """Collective: every rank's numbers, combined."""
        mine = {"times": self.times, "iface_tx": self.tx if self.has_iface else None,
                "iface_rx": self.rx if self.has_iface else None, "window_s": self.window_s}
        if self.is_ours:
            for k in ("bytes_sent", "bytes_received", "wire_bytes_sent", "dense_fp32_bytes",
                      "seconds_encode", "seconds_communicate", "seconds_decode"):
                mine[k] = [s[k] for s in self.stats]
        ranks = hvd.allgather_object(mine, name=f"bench.gather.{self.c.label}")
        steps = len(self.times)
        n = sum(g.numel() for g, _ in self.grads)
        per_step = [max(r["times"][i] for r in ranks) for i in range(steps)]
        res = {"model": self.model_name, "contender": self.c.label, "kind": self.c.kind,
               "numel": n, "ranks": hvd.size(), "options": self.c.options, **self.info,
               "steps": steps, "rounds": self.rounds, "warmup": self.warm,
               "first_step_s": self.first, "step_times": per_step, "time": summary(per_step),
               "rank_times": [r["times"] for r in ranks],
               "iface_tx": [r["iface_tx"] for r in ranks],
               "iface_rx": [r["iface_rx"] for r in ranks],
               "window_s": [r["window_s"] for r in ranks]}
        if self.profile:
            res["profile"] = self.profile
        if not self.is_ours:
            # Horovod keeps no byte counts: the ring model of its fused allreduce, per rank
            elem = 2 if self.c.method == "hvd_fp16" else 4
            ring = 2 * (hvd.size() - 1) * n * elem // hvd.size()
            res["wire_bytes_sent"] = [ring * steps] * len(ranks)
        else:
            for k in ("bytes_sent", "bytes_received", "wire_bytes_sent", "dense_fp32_bytes"):
                res[k] = [sum(r[k]) for r in ranks]          # per rank, over the timed steps
            for k in ("seconds_encode", "seconds_communicate", "seconds_decode"):
                res[k] = statistics.median(v for r in ranks for v in r[k])
        return res


# --- end-to-end training steps ------------------------------------------------------------------

class E2EBench:
    """Full training steps of the wide MLP with one contender (None: no exchange at all), with
    the exchange overlapping backward or not; in rounds, like SyncBench."""

    def __init__(self, c: Contender | None, overlap: bool, args):
        self.c, self.overlap, self.args = c, overlap, args
        self.label = c.label if c else "compute_only"
        self.last_opt = None
        self.first = None
        self.total = self.rounds = self.done_rounds = 0
        self.times = []
        self.numel = 0

    def pending(self) -> bool:
        return self.first is None or self.done_rounds < self.rounds

    def run_round(self):
        args = self.args
        torch.manual_seed(args.seed)                  # identical initial model on every rank
        model = WideMLP(width=args.e2e_width)
        gen = torch.Generator().manual_seed(args.seed * 7919 + hvd.rank())
        x = torch.randn(args.e2e_batch, 1024, generator=gen)
        y = torch.randint(0, 1000, (args.e2e_batch,), generator=gen)
        params = list(model.parameters())
        self.numel = sum(p.numel() for p in params)
        if self.c is None:
            opt = torch.optim.SGD(params, lr=0.01)
        else:
            opt = make_optimizer(self.c, params,
                                 [(f"e2e.{self.label}.{int(self.overlap)}.{n}", p)
                                  for n, p in model.named_parameters()],
                                 bucket_cap_mb=args.bucket_cap_mb)
        loss_fn = torch.nn.CrossEntropyLoss()

        def one_step() -> float:
            agree_max(0.0)
            t0 = time.perf_counter()
            # zeros in place: with hvd_signsgd the gradients stay views of its buckets (backward
            # accumulates straight into them); set_to_none would make it copy them in again
            model.zero_grad(set_to_none=False)   # (Horovod's zero_grad takes no argument)
            loss = loss_fn(model(x), y)
            if self.overlap:
                loss.backward()             # hooks launch exchanges while backward runs
            else:
                # torch.autograd.grad does not accumulate into .grad, so no hook of either
                # optimizer fires; step() -> synchronize() then launches every exchange at once
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p.grad = g
            opt.step()
            return time.perf_counter() - t0

        dt = agree_max(one_step())                     # warm-up of this optimizer
        if self.first is None:
            self.first = dt
            plan = argparse.Namespace(steps=args.e2e_steps, budget_s=args.budget_s,
                                      min_steps=args.min_steps)
            self.total = plan_steps(dt, plan)
            cheap = dt < args.budget_s / 4
            self.rounds = max(1, min(args.rounds, self.total)) if cheap else 1
            for _ in range(1, warmup_steps(dt, args)):
                one_step()
        r = self.done_rounds
        steps = self.total // self.rounds + (1 if r < self.total % self.rounds else 0)
        self.times += [one_step() for _ in range(steps)]
        self.done_rounds += 1
        self.last_opt = release(opt)

    def result(self) -> dict:
        ranks = hvd.allgather_object(self.times, name="bench.gather.e2e")
        per_step = [max(r[i] for r in ranks) for i in range(len(self.times))]
        return {"contender": self.label, "overlap": self.overlap, "numel": self.numel,
                "batch": self.args.e2e_batch, "steps": len(per_step), "rounds": self.rounds,
                "step_times": per_step, "time": summary(per_step)}


# --- run ----------------------------------------------------------------------------------------

def leak_check(bench, out: dict) -> None:
    """After a round: the round's optimizer must be gone, or memory grows round by round."""
    gc.collect()
    if bench.last_opt() is not None:
        leaks = out["meta"].setdefault("optimizers_not_freed", {})
        leaks[bench.label] = leaks.get(bench.label, 0) + 1
        if hvd.rank() == 0 and leaks[bench.label] == 1:
            print(f"[bench_comm] WARNING: the {bench.label} optimizer was not freed after its "
                  f"round (memory leak)", flush=True)


def machine_info() -> dict:
    def cmd(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in
                Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    ompi = next((line.strip() for line in cmd("mpirun", "--version").splitlines() if line), "")
    import hvd_signsgd
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mib": mem, "kernel": platform.release(),
            "os": cmd("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME").strip(),
            "python": platform.python_version(), "torch": torch.__version__,
            "horovod": getattr(sys.modules["horovod"], "__version__", "?"), "mpi": ompi,
            "hvd_signsgd": hvd_signsgd.__version__,
            "kernels": hvd_signsgd.kernels.backend(),
            "torch_threads": torch.get_num_threads()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet50,bert_base",
                   help=f"comma list of {', '.join(MODELS)} or d=N (one tensor of N "
                        f"elements), or '' for none")
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS,
                   help="comma list: hvd_fp32, hvd_fp16, or an hvd_signsgd method with "
                        "options as name:key=value:key=value (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (at most)")
    p.add_argument("--min-steps", type=int, default=3, help="timed steps (at least, budget "
                   "permitting)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the first "
                   "round (later rounds: 1, for the new optimizer)")
    p.add_argument("--rounds", type=int, default=3,
                   help="the contenders take turns in this many rounds (fairness on a busy "
                        "machine); slow contenders run in one")
    p.add_argument("--budget-s", type=float, default=20.0,
                   help="rough time budget of the timed steps of one contender")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--profile", default="signsgd,ssdm,ef_signsgd,topk,threshold",
                   help="hvd_signsgd methods that get one extra, cProfiled synchronize()")
    p.add_argument("--e2e", action="store_true", help="also time full training steps")
    p.add_argument("--e2e-contenders",
                   default="hvd_fp32,hvd_fp16,signsgd,ef_signsgd,topk:ratio=0.01")
    p.add_argument("--e2e-steps", type=int, default=6)
    p.add_argument("--e2e-batch", type=int, default=32)
    p.add_argument("--e2e-width", type=int, default=2688)
    p.add_argument("--iface", default=os.environ.get("HSG_NETSIM_IFACE", "net0"),
                   help="network interface whose counters are read on each host")
    p.add_argument("--rate", default="", help="label of the link rate, recorded in the output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file (written by rank 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hvd.init()
    rank = hvd.rank()
    log = (lambda *a: print("[bench_comm]", *a, flush=True)) if rank == 0 else (lambda *a: None)
    if not hvd.mpi_enabled() or hvd.gloo_enabled():
        raise SystemExit("bench_comm: Horovod must run on MPI (launch with mpirun)")
    hosts = hvd.allgather_object(platform.node(), name="bench.hosts")
    out = {"meta": {"rate": args.rate, "ranks": hvd.size(), "hosts": hosts,
                    "distinct_hosts": len(set(hosts)), "iface": args.iface,
                    "coll": os.environ.get("HSG_NETSIM_COLL", ""),
                    "argv": sys.argv[1:], "machine": machine_info() if rank == 0 else None,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    # other work on the machine distorts every number: keep the evidence
                    "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]},
           "sync": [], "e2e": []}

    def save():
        if rank == 0:
            tmp = Path(args.out + ".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(out, indent=1))
            tmp.replace(args.out)

    # background traffic (Horovod's and MPI's control messages) while nothing is exchanged
    agree_max(0.0)
    b0, t0 = iface_bytes(args.iface), time.perf_counter()
    time.sleep(1.0)
    agree_max(0.0)
    b1, dt = iface_bytes(args.iface), time.perf_counter() - t0
    idle = hvd.allgather_object((b1[0] - b0[0]) / dt if b0 and b1 else None, name="bench.idle")
    out["meta"]["idle_tx_bytes_per_s"] = idle
    save()

    contenders = parse_contenders(args.contenders)
    for model_name in filter(None, args.models.split(",")):
        shapes = model_shapes(model_name)
        numel = sum(torch.Size(s).numel() for _, s in shapes)
        if model_name in EXPECTED_NUMEL:
            assert numel == EXPECTED_NUMEL[model_name], (model_name, numel)
        grads = gradient_sources(shapes, args.seed)
        log(f"{model_name}: {len(shapes)} tensors, {numel / 1e6:.2f} M parameters, "
            f"rate {args.rate or '?'}, {hvd.size()} ranks on {len(set(hosts))} hosts")
        benches = []
        for c in contenders:
            why = unavailable(c)
            if why:
                log(f"  {c.label:22s} skipped: {why}")
                out["sync"].append({"model": model_name, "contender": c.label, "skipped": why})
            else:
                benches.append(SyncBench(model_name, shapes, grads, c, args))
        save()
        failed = {}
        while any(b.pending() for b in benches if b.c.label not in failed):
            for b in benches:
                if b.c.label in failed or not b.pending():
                    continue
                try:
                    b.run_round()
                    leak_check(b, out)
                    log(f"    {b.c.label:22s} round {b.done_rounds}/{b.rounds}: "
                        f"{len(b.times)}/{b.total} timed steps, last {1e3 * b.times[-1]:.0f} ms")
                except Exception as e:
                    # a method that fails the same way on every rank must not cost the other
                    # results (one failing on some ranks only hangs: run_bench.sh has a timeout)
                    failed[b.c.label] = f"{type(e).__name__}: {e}"
                    log(f"  {b.c.label:22s} FAILED: {failed[b.c.label]}")
                gc.collect()             # this contender's buffers, before the next one
        for b in benches:
            if b.c.label in failed:
                out["sync"].append({"model": model_name, "contender": b.c.label,
                                    "failed": failed[b.c.label]})
                continue
            r = b.result()
            out["sync"].append(r)
            t = r["time"]
            line = (f"  {b.c.label:22s} {1e3 * t['median']:9.1f} ms median "
                    f"[{1e3 * t['min']:.1f}-{1e3 * t['max']:.1f}] n={t['n']}; MB/step per "
                    f"rank: wire model {r['wire_bytes_sent'][0] / r['steps'] / 1e6:.3f}")
            if r["iface_tx"][0] is not None:
                line += f", iface tx {r['iface_tx'][0] / r['steps'] / 1e6:.3f}"
            if b.is_ours:
                line += (f"; enc {1e3 * r['seconds_encode']:.1f} comm "
                         f"{1e3 * r['seconds_communicate']:.1f} dec "
                         f"{1e3 * r['seconds_decode']:.1f} ms")
            log(line)
        save()
        del grads
        gc.collect()

    if args.e2e:
        log(f"e2e: wide MLP, batch {args.e2e_batch} per rank")
        benches = [E2EBench(None, False, args)] + [
            E2EBench(c, overlap, args) for c in parse_contenders(args.e2e_contenders)
            if not unavailable(c) for overlap in (True, False)]
        while any(b.pending() for b in benches):
            for b in benches:
                if b.pending():
                    b.run_round()
                    leak_check(b, out)
        for b in benches:
            r = b.result()
            out["e2e"].append(r)
            log(f"  {r['contender']:22s} overlap={r['overlap']!s:5s} "
                f"{1e3 * r['time']['median']:9.1f} ms/step (n={r['steps']})")
        save()
    out["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out["meta"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
