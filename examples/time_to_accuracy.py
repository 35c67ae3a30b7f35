"""Time to accuracy: every hvd_signsgd method against Horovod fp32 and fp16, end to end.

Run it under MPI, one rank per (simulated) host; examples/netsim/run_time_to_accuracy.sh sets
up the bandwidth-limited cluster (4 hosts, 1 Gbit/s) and tears it down again:

    mpirun -np 4 python examples/time_to_accuracy.py --out-dir runs/tta

The model: an MLP 64 -> W -> W -> 10 (W = --hidden, default 1536: 2.48 M parameters, 9.9 MB of
float32 gradients) on scikit-learn's bundled digits (8x8 images, 1437 train / 360 test, nothing
downloaded). The input is only 64 wide, so almost all parameters (and all communication) sit
in the W x W layer, while the compute per step stays small (batch 16 per rank: about 0.24
GFLOP forward + backward). A dense layer costs 6 x batch flops per parameter per step whatever
its shape, and a CNN on upsampled images would cost far more per parameter; with 4 ranks on 2
shared cores, a small batch and a wide MLP are what keep communication a visible share of the
step (Horovod fp32: 1.5 x 9.9 MB through each 1 Gbit/s link per step, about 120 ms).

The contenders, each from the same initialisation (same seed, broadcast from rank 0) and the
same sequence of batches:

    hvd_fp32, hvd_fp16   stock hvd.DistributedOptimizer, Compression.none / .fp16
    <method>             hvd_signsgd.DistributedOptimizer(method=<method>) for every method in
                         hvd_signsgd.METHODS, with the learning rate of SETTINGS below
    <name>:k=v:...       a contender with overrides (lr, momentum, dampening: the SGD it wraps;
                         anything else: a method option), e.g. signsgd:lr=0.0003

All contenders live side by side and take turns, --eval-every steps each, so that other work on
a shared machine weighs on all of them alike. The wall clock of a contender is the sum of its
own training segments only: each segment starts after a barrier and lasts until the slowest
rank has finished its last step (forward, backward, exchange, update). Test-set evaluation
(rank 0, after each segment) and the barriers are outside the clock, for every contender alike.
A contender stops at --steps steps or after --time-budget-s seconds of its own wall clock.

Target accuracy = Horovod fp32's final accuracy (the mean of its last 3 evaluations, since one
evaluation on 360 images moves in steps of 0.28 points) minus --target-drop (1 point). Time to
target = the wall clock at the first evaluation at or above it; the table also gives an
estimate, steps to target x median step time, that one slow segment does not move.

Output (rank 0, in --out-dir): time_to_accuracy.json (settings, machine, load average, per
contender the curve of (wall seconds, step, test accuracy), bytes per step), time_to_accuracy.md
(the table) and time_to_accuracy.png (accuracy against wall time, and against step).
`--from-json FILE --out-dir DIR` redraws the table and plot from a saved JSON, without training.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Runs from a checkout: make `import hvd_signsgd` work without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HOROVOD_CONTROLLER", "mpi")
os.environ.setdefault("HOROVOD_CPU_OPERATIONS", "mpi")

import horovod.torch as hvd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import hvd_signsgd  # noqa: E402

# Settings per contender for the W=1536 MLP, batch 16 per rank, 4 ranks; train_digits.py's
# DEFAULTS (a 128-wide MLP) are the starting point. Sign methods move every coordinate by lr, so
# their lr shrinks with the fan-in of the wide layer (signsgd 0.0003 here against 0.002 there).
# Scaled-sign methods (ef_signsgd, ecx) step by about the mean |gradient| per coordinate, which
# is small in the wide layer (~3e-4): a larger lr. The threshold lam gives ~1% density with error
# feedback here (|g| has its 99th percentile at ~0.003). Checked with this script (150 steps,
# 4 ranks): stochastic_sign 0.0015 / 0.003 / 0.006, ssdm 0.003 / 0.006 / 0.01, randomk 0.1 / 0.3,
# ecx 0.05 / 0.1 / 0.2, signsgd 0.0002 / 0.0003; the best of each is here. signsgd,
# stochastic_sign and ecx stayed 1-2 points below fp32 at every lr tried.
SETTINGS = {
    "hvd_fp32": dict(lr=0.1, momentum=0.9),
    "hvd_fp16": dict(lr=0.1, momentum=0.9),
    "none": dict(lr=0.1, momentum=0.9),
    "fp16": dict(lr=0.1, momentum=0.9),
    "signsgd": dict(lr=0.0003, momentum=0.0),
    "signum": dict(lr=0.0003, momentum=0.0),
    "stochastic_sign": dict(lr=0.003, momentum=0.0),
    "ssdm": dict(lr=0.006, momentum=0.0),
    "ef_signsgd": dict(lr=0.5, momentum=0.0),
    "topk": dict(lr=0.1, momentum=0.9, opts={"ratio": 0.01}),
    "threshold": dict(lr=0.1, momentum=0.9, opts={"lam": 0.01}),
    "randomk": dict(lr=0.3, momentum=0.0, opts={"ratio": 0.05}),
    "ecx": dict(lr=0.2, momentum=0.9, dampening=0.9, opts={"alpha": 0.1}),
}
OPTIMIZER_KEYS = ("lr", "momentum", "dampening")


def default_contenders() -> str:
    return ",".join(["hvd_fp32", "hvd_fp16"] + [m for m in hvd_signsgd.METHODS])


class Contender:
    """One entry of --contenders: 'hvd_fp32', 'signsgd' or 'signsgd:lr=0.001:beta=0.9'."""

    def __init__(self, spec: str):
        self.label = spec
        self.name, *pairs = spec.split(":")
        self.horovod = self.name in ("hvd_fp32", "hvd_fp16")
        base = SETTINGS.get(self.name)
        if base is None:
            raise ValueError(f"no settings for {self.name!r}; give them, e.g. "
                             f"{self.name}:lr=0.01:momentum=0")
        self.opt = {k: base[k] for k in OPTIMIZER_KEYS if k in base}
        self.opts = dict(base.get("opts", {}))
        for pair in pairs:
            k, sep, v = pair.partition("=")
            if not sep:
                raise ValueError(f"bad option {pair!r} in {spec!r} (want key=value)")
            (self.opt if k in OPTIMIZER_KEYS else self.opts)[k] = _value(v)
        if self.horovod and self.opts:
            raise ValueError(f"{spec!r}: Horovod contenders take lr/momentum/dampening only")
        if not self.horovod and self.name not in hvd_signsgd.METHODS:
            raise ValueError(f"{self.name!r} is not in hvd_signsgd.METHODS")


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def make_model(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10))


def load_data(seed: int):
    """train_digits.py's split: 360 test images, the rest for training, shuffled by seed."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[360:], y[360:]), (x[:360], y[:360])


def agree_max(x: float, name: str = "tta.agree") -> float:
    """Max over ranks; doubles as a barrier."""
    return float(hvd.allreduce(torch.tensor([float(x)], dtype=torch.float64), op=hvd.Max,
                               name=name))


def iface_tx(iface: str):
    try:
        return int((Path("/sys/class/net") / iface / "statistics" / "tx_bytes").read_text())
    except OSError:
        return None


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


class Run:
    """One contender's model, optimizer, batch stream, wall clock and curve."""

    def __init__(self, c: Contender, args, data):
        self.c, self.args = c, args
        (xtr, ytr), _ = data
        rank, size = hvd.rank(), hvd.size()
        self.x, self.y = xtr[rank::size], ytr[rank::size]
        torch.manual_seed(args.seed)                  # the same initialisation for everyone
        self.model = make_model(args.hidden)
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        # parameter names must be unique across the contenders living side by side
        named = [(f"{c.label}.{n}", p) for n, p in self.model.named_parameters()]
        base = torch.optim.SGD(self.model.parameters(), **c.opt)
        if c.horovod:
            comp = hvd.Compression.fp16 if c.name == "hvd_fp16" else hvd.Compression.none
            self.opt = hvd.DistributedOptimizer(base, named_parameters=named, compression=comp)
        else:
            self.opt = hvd_signsgd.DistributedOptimizer(base, named_parameters=named,
                                                        method=c.name, **c.opts)
        self.numel = sum(p.numel() for p in self.model.parameters())
        self.gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
        self.perm, self.pos = torch.randperm(len(self.y), generator=self.gen), 0
        self.step = 0
        self.wall = 0.0
        self.segments = []            # seconds of each segment (slowest rank)
        self.curve = []               # (wall seconds, step, test accuracy, train loss)
        self.tx = 0                   # bytes this rank's interface sent inside the segments
        self.loss = float("nan")
        self.failed = None

    def done(self) -> bool:
        return (self.failed is not None or self.step >= self.args.steps
                or self.wall >= self.args.time_budget_s)

    def batch(self):
        b = self.args.batch_size
        if self.pos + b > len(self.y):               # a new epoch: a fresh permutation
            self.perm, self.pos = torch.randperm(len(self.y), generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + b]
        self.pos += b
        return self.x[idx], self.y[idx]

    def segment(self, steps: int) -> None:
        """Train `steps` steps on the clock (barrier first; the slowest rank's time)."""
        self.model.train()
        agree_max(0.0)
        tx0 = iface_tx(self.args.iface)
        t0 = time.perf_counter()
        for _ in range(steps):
            xb, yb = self.batch()
            self.opt.zero_grad()
            loss = F.cross_entropy(self.model(xb), yb)
            loss.backward()
            self.opt.step()
            self.step += 1
        dt = time.perf_counter() - t0
        tx1 = iface_tx(self.args.iface)
        self.loss = float(loss.detach())
        dt = agree_max(dt)
        if tx0 is not None and tx1 is not None:
            self.tx += tx1 - tx0
        self.segments.append(dt)
        self.wall += dt

    def evaluate(self, xte, yte) -> None:
        """Rank 0 only, off the clock (parameters are identical on every rank)."""
        if hvd.rank() != 0:
            return
        self.model.eval()
        with torch.no_grad():
            acc = (self.model(xte).argmax(1) == yte).float().mean().item()
        self.curve.append((self.wall, self.step, acc, self.loss))

    def bytes_per_step(self) -> dict:
        """Bytes this rank handed to the collectives per step: hvd_signsgd's exact counts;
        for Horovod, the ring model of its fused allreduce (it keeps no counts)."""
        n = hvd.size()
        if self.c.horovod:
            elem = 2 if self.c.name == "hvd_fp16" else 4
            sent = self.numel * elem
            return {"sent": sent, "wire": 2 * (n - 1) * sent // n, "source": "model"}
        s = self.opt.compression_stats()
        steps = max(self.step, 1)
        return {"sent": s["total_bytes_sent"] / steps,
                "wire": s.get("total_wire_bytes_sent", s["wire_bytes_sent"] * steps) / steps,
                "received": s["total_bytes_received"] / steps,
                "dense_fp32": s["total_dense_fp32_bytes"] / steps, "source": "compression_stats"}


def summarise(runs: list, args, meta: dict) -> dict:
    """Per contender: curve, final accuracy, time and steps to the target, speed-ups."""
    # the reference: the first Horovod fp32 contender (its lr may be overridden)
    ref = next((r for r in runs if r.c.name == "hvd_fp32"), None)
    target = None
    if ref is not None and ref.curve:
        tail = [a for _, _, a, _ in ref.curve[-3:]]
        target = statistics.mean(tail) - args.target_drop
    res = []
    for r in runs:
        item = {"contender": r.c.label, "method": r.c.name, "horovod": r.c.horovod,
                "optimizer": r.c.opt, "options": r.c.opts, "numel": r.numel,
                "steps": r.step, "wall_s": r.wall, "failed": r.failed,
                "curve": [{"wall_s": w, "step": s, "test_acc": a, "train_loss": lo}
                          for w, s, a, lo in r.curve],
                "step_s_median": statistics.median(
                    [t / args.eval_every for t in r.segments[:-1]] or
                    [r.wall / max(r.step, 1)]),
                "bytes_per_step": r.bytes_per_step() if r.failed is None else None,
                "iface_tx_per_step": r.tx_all}
        if r.curve:
            item["final_acc"] = statistics.mean(a for _, _, a, _ in r.curve[-3:])
            item["best_acc"] = max(a for _, _, a, _ in r.curve)
        hit = next(((w, s) for w, s, a, _ in r.curve if target is not None and a >= target),
                   None)
        item["time_to_target_s"], item["steps_to_target"] = hit if hit else (None, None)
        res.append(item)
    speedups(res)
    return {"meta": meta, "target_acc": target, "target_drop": args.target_drop,
            "results": res}


def speedups(res: list) -> None:
    """Speed-ups against Horovod fp32 / fp16, of the measured time to target and of an
    estimate (steps to target x median step time) that one slow segment (another job's burst
    on a shared machine) does not move."""
    for i in res:
        i["time_to_target_est_s"] = (i["steps_to_target"] * i["step_s_median"]
                                     if i["steps_to_target"] else None)
    by = {}
    for i in res:                    # the first contender of each Horovod kind is the base
        by.setdefault(i["method"], i)
    for i in res:
        for base in ("hvd_fp32", "hvd_fp16"):
            for key, tag in (("time_to_target_s", ""), ("time_to_target_est_s", "est_")):
                b, t = by.get(base, {}).get(key), i[key]
                i[f"speedup_{tag}vs_{base}"] = b / t if b and t else None


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def markdown(summary: dict) -> str:
    m = summary["meta"]
    t = summary["target_acc"]
    lines = [
        "# Time to accuracy",
        "",
        f"{m['ranks']} ranks on {m['distinct_hosts']} hosts, link rate {m['rate'] or '?'}; "
        f"MLP 64-{m['hidden']}-{m['hidden']}-10 ({m['numel'] / 1e6:.2f} M parameters), "
        f"digits, batch {m['batch_size']} per rank, up to {m['steps']} steps or "
        f"{m['time_budget_s']:.0f} s per contender, test accuracy every {m['eval_every']} "
        f"steps (off the clock). Machine: {m['machine']}. Load average (1/5/15 min) at "
        f"start {m['loadavg_start']}, at end {m.get('loadavg_end')}; samples during the run: "
        f"min/median/max of the 1-min value "
        f"{m.get('loadavg_1min_min')}/{m.get('loadavg_1min_median')}/"
        f"{m.get('loadavg_1min_max')}.",
        "",
        f"Target: Horovod fp32's final accuracy (mean of its last 3 evaluations) − "
        f"{100 * summary['target_drop']:.0f} point = **{fmt(t, '.4f')}**.",
        "",
        "| contender | lr / momentum | options | final acc | best acc | steps to target "
        "| wall s to target | × vs fp32 | × vs fp16 | ms / step | est. s (× fp32, × fp16) "
        "| MB sent / step / rank | iface MB tx / step / rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        o = r["optimizer"]
        bps = r["bytes_per_step"] or {}
        sent = bps.get("sent")
        src = " (model)" if bps.get("source") == "model" else ""
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "–"
        name = f"`{r['contender']}`" + (" FAILED" if r["failed"] else "")
        lines.append(
            f"| {name} | {o.get('lr')} / {o.get('momentum', 0)} | {opts} "
            f"| {fmt(r.get('final_acc'), '.4f')} | {fmt(r.get('best_acc'), '.4f')} "
            f"| {fmt(r['steps_to_target'], 'd')} | {fmt(r['time_to_target_s'], '.1f')} "
            f"| {fmt(r['speedup_vs_hvd_fp32'], '.2f')} | {fmt(r['speedup_vs_hvd_fp16'], '.2f')} "
            f"| {1e3 * r['step_s_median']:.0f} "
            f"| {fmt(r['time_to_target_est_s'], '.1f')} "
            f"({fmt(r['speedup_est_vs_hvd_fp32'], '.2f')}, "
            f"{fmt(r['speedup_est_vs_hvd_fp16'], '.2f')}) "
            f"| {fmt(sent / 1e6 if sent is not None else None, '.3f')}{src} "
            f"| {fmt(r['iface_tx_per_step'] / 1e6 if r['iface_tx_per_step'] else None, '.3f')} |")
    lines += [
        "",
        "*final acc*: mean of the last 3 evaluations. *ms / step*: median over the timed "
        "segments (the slowest rank). *est. s*: steps to target × median ms / step, an "
        "estimate that one slow segment (other jobs on the machine) does not move, and its "
        "speed-ups. *MB sent*: hvd_signsgd's compression_stats() "
        "(total_bytes_sent / steps, headers included); for Horovod the float32/float16 "
        "gradient handed to its allreduce (a ring sends 2(n−1)/n of that on each link). "
        "*iface*: bytes the rank's network interface really sent during the timed segments "
        "(mean over ranks; – when not on the simulated cluster). –: target not reached.",
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    for i, r in enumerate(summary["results"]):
        if not r["curve"]:
            continue
        style = "-" if i < 10 else "--"
        lw = 2.4 if r["horovod"] else 1.4
        color = "black" if r["contender"] == "hvd_fp32" else (
            "grey" if r["contender"] == "hvd_fp16" else None)
        w = [p["wall_s"] for p in r["curve"]]
        s = [p["step"] for p in r["curve"]]
        a = [p["test_acc"] for p in r["curve"]]
        ax1.plot(w, a, style, lw=lw, color=color, label=r["contender"])
        ax2.plot(s, a, style, lw=lw, color=color, label=r["contender"])
    for ax, xl in ((ax1, "wall time, s (training only)"), (ax2, "step")):
        if summary["target_acc"] is not None:
            ax.axhline(summary["target_acc"], color="red", lw=0.8, ls=":",
                       label="target" if ax is ax1 else None)
        ax.set_xlabel(xl)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.5, 1.0)
        ax.grid(alpha=0.3)
    m = summary["meta"]
    ax1.set_title(f"digits MLP ({m['numel'] / 1e6:.2f} M params), {m['ranks']} ranks, "
                  f"{m['rate'] or '?'}")
    ax2.set_title("the same against steps")
    ax1.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contenders", default=None,
                   help="comma list (default: hvd_fp32, hvd_fp16 and every method in "
                        "hvd_signsgd.METHODS); name:key=value overrides lr/momentum/options")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--steps", type=int, default=150, help="step budget per contender")
    p.add_argument("--time-budget-s", type=float, default=90.0,
                   help="wall-clock budget per contender (training time only)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--target-drop", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iface", default=os.environ.get("HSG_NETSIM_IFACE", "net0"))
    p.add_argument("--rate", default="", help="label of the link rate, for the output")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--from-json", default=None,
                   help="redraw the table and plot from a time_to_accuracy.json; no training")
    return p.parse_args(argv)


def render(summary: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "time_to_accuracy.json").write_text(json.dumps(summary, indent=1))
    md = markdown(summary)
    (out / "time_to_accuracy.md").write_text(md)
    plot(summary, str(out / "time_to_accuracy.png"))
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        summary = json.loads(Path(args.from_json).read_text())
        speedups(summary["results"])
        print(render(summary, Path(args.out_dir)))
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hvd.init()
    rank = hvd.rank()
    log = (lambda *a: print("[tta]", *a, flush=True)) if rank == 0 else (lambda *a: None)
    try:
        contenders = [Contender(s) for s in
                      filter(None, (x.strip() for x in
                                    (args.contenders or default_contenders()).split(",")))]
    except ValueError as e:          # the same on every rank: every rank leaves with it
        raise SystemExit(f"time_to_accuracy: {e}") from None
    if len({c.label for c in contenders}) != len(contenders):
        raise SystemExit("time_to_accuracy: a contender is listed twice")
    hosts = hvd.allgather_object(platform.node(), name="tta.hosts")
    data = load_data(args.seed)
    _, (xte, yte) = data
    runs = [Run(c, args, data) for c in contenders]
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    meta = {"ranks": hvd.size(), "hosts": hosts, "distinct_hosts": len(set(hosts)),
            "rate": args.rate, "hidden": args.hidden, "numel": runs[0].numel if runs else 0,
            "batch_size": args.batch_size, "steps": args.steps,
            "time_budget_s": args.time_budget_s, "eval_every": args.eval_every,
            "seed": args.seed, "argv": sys.argv[1:],
            "machine": f"{cpu}, {os.cpu_count()} cores, {platform.node()}",
            "torch": torch.__version__, "hvd_signsgd": hvd_signsgd.__version__,
            "kernels": hvd_signsgd.kernels.backend(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": loadavg()}
    log(f"{len(runs)} contenders, {meta['numel'] / 1e6:.2f} M parameters, {hvd.size()} ranks "
        f"on {meta['distinct_hosts']} hosts, rate {args.rate or '?'}")
    for r in runs:
        r.evaluate(xte, yte)             # step 0: the common starting point
    loads, rnd, t_start = [], 0, time.perf_counter()
    while not all(r.done() for r in runs):
        rnd += 1
        for r in runs:
            if r.done():
                continue
            steps = min(args.eval_every, args.steps - r.step)
            try:
                r.segment(steps)
            except Exception as e:      # a method failing alike on every rank costs only itself
                r.failed = f"{type(e).__name__}: {e}"
                log(f"  {r.c.label} FAILED: {r.failed}")
                continue
            r.evaluate(xte, yte)
        loads.append(loadavg()[0])
        if rank == 0:
            log(f"round {rnd} ({time.perf_counter() - t_start:.0f} s): " + "  ".join(
                f"{r.c.label} {r.step}/{r.wall:.0f}s/{r.curve[-1][2]:.3f}" for r in runs
                if r.curve))
            # the curves so far, in case the run is cut short (driver timeout)
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.out_dir) / "time_to_accuracy.partial.json").write_text(json.dumps(
                {"meta": meta, "loadavg_1min": loads,
                 "curves": {r.c.label: r.curve for r in runs}}))
    # bit-identical parameters on every rank, per contender
    for r in runs:
        cs = sum(float(p.detach().double().sum()) for p in r.model.parameters())
        r.ranks_identical = len(set(hvd.allgather_object(cs, name="tta.sum"))) == 1
        tx = hvd.allgather_object(r.tx, name="tta.tx")
        r.tx_all = statistics.mean(tx) / max(r.step, 1) if r.tx else None
    meta.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), loadavg_end=loadavg(),
                loadavg_1min_min=min(loads), loadavg_1min_max=max(loads),
                loadavg_1min_median=statistics.median(loads))
    if rank != 0:
        return 0
    summary = summarise(runs, args, meta)
    for item, r in zip(summary["results"], runs):
        item["ranks_identical"] = r.ranks_identical
    print(render(summary, Path(args.out_dir)), flush=True)
    (Path(args.out_dir) / "time_to_accuracy.partial.json").unlink(missing_ok=True)  # finished
    log(f"wrote {args.out_dir}/time_to_accuracy.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
