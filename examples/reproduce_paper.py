"""Reproduce the small-scale experiments of ALGORITHMS.md section 9 and say which claims hold.

    python examples/reproduce_paper.py                 # every experiment (a few minutes, 2 cores)
    python examples/reproduce_paper.py --only fault_tolerance
    python examples/reproduce_paper.py --quick         # smoke version, numbers not meaningful

Each experiment prints its numbers, writes a PNG into --outdir (default examples/results/) and
a section of paper_reproduction.md, which states for each claim whether this run confirmed it.

Multi-rank runs use hvd_signsgd.simulate.Simulation: n virtual ranks in one process with the
real codecs, payload bytes and aggregation rules, the collective replaced by concatenation.
The digits runs mirror examples/train_digits.py step for step (same data split, shards, model,
per-rank batch order, bucket layout and the rule that tensors under 128 elements go dense), so
a simulated run gives the same test accuracy as the MPI job with the same arguments
(tests/multirank/test_examples.py checks this for signum on 2 ranks). Simulation is what lets
adversarial ranks be a one-line change and keeps the whole run within minutes.

The parts of section 9 that are unit tests already are only referred to: the section 1-2
quadratics, the section 3.4 1-D instance, section 3.5(b), the section 4 counterexample and the
EF invariant (tests/unit/test_sign_methods.py).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_digits as td  # noqa: E402

from hvd_signsgd import METHODS, NonFiniteGradientError, ssdm_lr_lambda  # noqa: E402
from hvd_signsgd.simulate import Simulation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MIN_COMPRESS_NUMEL = 128    # DistributedOptimizer's default: smaller tensors travel dense


# --- bookkeeping ----------------------------------------------------------------------------------

@dataclass
class Finding:
    """What one experiment reports: a claim, a verdict and the evidence."""
    key: str
    section: str
    title: str
    claim: str
    confirmed: bool | None          # None: not run (requirement missing)
    verdict: str = ""               # one line: the measured numbers behind the verdict
    lines: list = field(default_factory=list)   # Markdown body: tables, remarks
    figure: str | None = None


@dataclass
class Settings:
    quick: bool
    outdir: Path
    seeds: tuple
    epochs: int          # digits epochs per run

    def grid(self, values):
        """A learning-rate grid; --quick keeps only its middle value."""
        return (values[len(values) // 2],) if self.quick else tuple(values)


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def fmt_spread(xs, digits=3):
    """'mean (min-max)' over seeds; a single value when there is one seed."""
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{mean(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def verdict_word(ok):
    return {True: "confirmed", False: "NOT confirmed", None: "not run"}[ok]


def save(fig, settings, name):
    path = settings.outdir / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return name


def band(ax, x, runs, label, **style):
    """Mean over seeds as a line, min-max over seeds as a shaded band."""
    cols = list(zip(*runs))
    mid = [mean(c) for c in cols]
    line, = ax.plot(x, mid, label=label, **style)
    if len(runs) > 1:
        ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols],
                        color=line.get_color(), alpha=0.15, linewidth=0)


# --- digits: examples/train_digits.py with n virtual ranks ----------------------------------------

@dataclass(frozen=True)
class DigitsRun:
    method: str
    ranks: int = 4
    epochs: int = 12
    seed: int = 0
    lr: float | None = None          # None: train_digits.DEFAULTS
    momentum: float | None = None
    dampening: float = 0.0
    shards: str = "iid"
    options: tuple = ()              # method options as sorted (key, value) pairs
    adversaries: int = 0             # ranks 0..adversaries-1 send adversary_scale * g
    adversary_scale: float = -1.0
    ssdm_schedule: bool = False      # lr_k = lr (k + 1)^(-3/4) (LambdaLR(ssdm_lr_lambda))


_digits_cache: dict = {}


def run_digits(cfg: DigitsRun) -> dict:
    """One simulated training run; per-epoch test accuracy, full training loss and MB sent per
    rank. Cached: experiments share their baseline runs."""
    if cfg in _digits_cache:
        return _digits_cache[cfg]
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)
    (xtr, ytr), (xte, yte) = td.load_data(cfg.seed)
    shards = [td.shard(xtr, ytr, r, cfg.ranks, cfg.shards) for r in range(cfg.ranks)]
    model = td.make_model(128)
    d = td.DEFAULTS.get(cfg.method, td.DEFAULTS["signum"])   # train_digits' own fallback
    lr = d["lr"] if cfg.lr is None else cfg.lr
    momentum = d["momentum"] if cfg.momentum is None else cfg.momentum
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, dampening=cfg.dampening)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ssdm_lr_lambda) if cfg.ssdm_schedule else None

    # The optimizer's buckets: reverse registration order, small tensors in a dense bucket.
    params = list(reversed(list(model.parameters())))
    groups = [[p for p in params if p.numel() >= MIN_COMPRESS_NUMEL],
              [p for p in params if p.numel() < MIN_COMPRESS_NUMEL]]
    sims = [Simulation(cfg.method, cfg.ranks, [p.numel() for p in groups[0]],
                       **dict(cfg.options)),
            Simulation("none", cfg.ranks, [p.numel() for p in groups[1]])]
    gens = [torch.Generator().manual_seed(cfg.seed * 1000 + r) for r in range(cfg.ranks)]
    batch = 32
    steps = min(len(ys) for _, ys in shards) // batch
    acc, loss, mb = [], [], []
    diverged = False
    for _epoch in range(cfg.epochs):
        perms = [torch.randperm(len(ys), generator=g) for (_, ys), g in zip(shards, gens)]
        for i in range(steps if not diverged else 0):
            grads = [[], []]
            for r, ((xs, ys), perm) in enumerate(zip(shards, perms)):
                idx = perm[i * batch:(i + 1) * batch]
                model.zero_grad()
                F.cross_entropy(model(xs[idx]), ys[idx]).backward()
                scale = cfg.adversary_scale if r < cfg.adversaries else 1.0
                for k in (0, 1):
                    grads[k].append([scale * p.grad for p in groups[k]])
            try:
                for sim, group, g in zip(sims, groups, grads):
                    update = sim.step(g)
                    for p, (o, s) in zip(group, sim.layout.segments()):
                        p.grad = update[o:o + s].view_as(p).clone()
            except NonFiniteGradientError:
                diverged = True      # every rank refuses the step; the run is over
                break
            opt.step()
            if sched is not None:
                sched.step()
        with torch.no_grad():
            full = float(F.cross_entropy(model(xtr), ytr))
        acc.append(td.accuracy(model, xte, yte))
        loss.append(full if math.isfinite(full) else float("inf"))
        mb.append(sum(s.bytes_sent[0] for s in sims) / 1e6)
        diverged = diverged or not math.isfinite(full)
    out = {"test_acc": acc, "train_loss": loss, "mb_sent": mb, "diverged": diverged}
    _digits_cache[cfg] = out
    return out


def digits_seeds(settings, **kw):
    base = DigitsRun(epochs=settings.epochs, **kw)
    return [run_digits(replace(base, seed=s)) for s in settings.seeds]


def final(runs, key="test_acc"):
    return [r[key][-1] for r in runs]


# --- 9.1 majority vote noise reduction ------------------------------------------------------------

def exp_vote_noise(st: Settings) -> Finding:
    """Fraction of coordinates where the vote of n noisy signs is wrong, n = 1..15."""
    d = 20_000 if st.quick else 200_000
    gen = torch.Generator().manual_seed(0)
    g = 0.1 * torch.randn(d, generator=gen)            # |g_i| ~ 0.1 |N(0,1)|
    truth = torch.sign(g)
    # Theory for the same g: one sign is wrong with p_i = Phi(-|g_i|); the vote of odd n is
    # wrong when more than n/2 are: a binomial tail.
    p = 0.5 * torch.erfc(g.abs().double() / math.sqrt(2))
    ns = (1, 3, 5, 7, 9, 15)
    rows, measured, theory = [], [], []
    for n in ns:
        sim = Simulation("signsgd", n_ranks=n, sizes=[d])     # the real vote on packed bits
        vote = sim.step([g + torch.randn(d, generator=gen) for _ in range(n)])
        wrong = float((vote != truth).double().mean())
        tail = sum(math.comb(n, j) * p**j * (1 - p)**(n - j) for j in range(n // 2 + 1, n + 1))
        th = float(tail.mean())
        se = math.sqrt(wrong * (1 - wrong) / d)
        measured.append(wrong)
        theory.append(th)
        rows.append((n, f"{wrong:.4f}", f"{th:.4f}", f"{se:.4f}"))
        print(f"  n={n:2d}: wrong fraction {wrong:.4f} (theory {th:.4f}, s.e. {se:.4f})")
    ok = all(a > b for a, b in zip(measured, measured[1:]))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(ns, measured, "o-", label="measured (real vote kernel)")
    ax.plot(ns, theory, "k--", label="binomial tail, same g")
    ax.set_xlabel("ranks n")
    ax.set_ylabel("fraction of wrong coordinates")
    ax.set_title("Majority vote of n noisy signs")
    ax.grid(alpha=0.3)
    ax.legend()
    return Finding(
        "vote_noise", "9.1", "Majority vote noise reduction",
        "the fraction of coordinates where sign(sum_m sign(g + noise_m)) != sign(g) falls "
        "strictly as n grows (ALGORITHMS.md: 0.469 -> 0.403 for n = 1 -> 15)",
        ok, f"{measured[0]:.3f} (n=1) -> {measured[-1]:.3f} (n=15), strictly decreasing: {ok}; "
            f"within 3 s.e. of the binomial tail at every n: "
            f"{all(abs(m - t) < 3 * math.sqrt(m * (1 - m) / d) for m, t in zip(measured, theory))}",
        [f"d = {d} coordinates, g_i = 0.1 N(0,1), noise N(0,1) per rank.", ""]
        + md_table(("n", "wrong fraction", "theory", "s.e."), rows),
        save(fig, st, "vote_noise.png"))


# --- 9.3 fault tolerance --------------------------------------------------------------------------

def exp_fault_tolerance(st: Settings) -> Finding:
    """Digits MLP, 5 ranks: Signum + vote with 0-3 sign-flipping ranks; mean SGD with one
    rank sending -10 g."""
    runs = {}
    for a in range(4):
        runs[f"signum, {a} flipping"] = digits_seeds(st, method="signum", ranks=5, adversaries=a)
    runs["SGD mean, 0 adversaries"] = digits_seeds(st, method="none", ranks=5)
    runs["SGD mean, 1 sends -10 g"] = digits_seeds(st, method="none", ranks=5, adversaries=1,
                                                   adversary_scale=-10.0)
    rows = []
    for label, rs in runs.items():
        div = sum(r["diverged"] for r in rs)
        rows.append((label, fmt_spread(final(rs)), f"{div}/{len(rs)}"))
        print(f"  {label:28s} test acc {fmt_spread(final(rs))}  diverged {div}/{len(rs)}")
    acc = {k: mean(final(v)) for k, v in runs.items()}
    clean = acc["signum, 0 flipping"]
    ok = (acc["signum, 1 flipping"] > clean - 0.05 and acc["signum, 2 flipping"] > clean - 0.10
          and acc["signum, 3 flipping"] < 0.5
          and acc["SGD mean, 1 sends -10 g"] < 0.5 < acc["SGD mean, 0 adversaries"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = list(range(1, st.epochs + 1))
    for label, rs in runs.items():
        band(ax, x, [r["test_acc"] for r in rs], label,
             linestyle="--" if label.startswith("SGD") else "-")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("5 ranks, adversarial minority (digits MLP)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Finding(
        "fault_tolerance", "9.3", "Fault tolerance of the majority vote",
        "with 5 ranks, Signum + majority vote keeps its accuracy with 1-2 sign-flipping ranks and "
        "collapses with 3; mean-aggregated SGD fails with one rank sending -10 g",
        ok, "signum test acc with 0/1/2/3 flipping ranks: "
            + " / ".join(f"{acc[f'signum, {a} flipping']:.3f}" for a in range(4))
            + f"; SGD {acc['SGD mean, 0 adversaries']:.3f} clean, "
              f"{acc['SGD mean, 1 sends -10 g']:.3f} with one -10 g rank",
        [f"Criteria: 1 flip within 5 points and 2 flips within 10 points of the clean run, "
         f"3 flips below 50%, SGD with the -10 g rank below 50%. {st.epochs} epochs, "
         f"train_digits.DEFAULTS for lr/momentum, {len(st.seeds)} seed(s), "
         f"mean (min-max).", ""]
        + md_table(("configuration", "final test accuracy", "diverged (NaN/Inf)"), rows)
        + ["", "The section 2 quadratic version is tests/unit/test_sign_methods.py::"
               "test_majority_vote_fault_tolerance and ::test_mean_aggregation_breaks_with_one_"
               "adversary."],
        save(fig, st, "fault_tolerance.png"))


# --- 9.4 heterogeneity ----------------------------------------------------------------------------

# label -> DigitsRun fields; lr/momentum from train_digits.DEFAULTS unless given
HETERO_METHODS = {
    "none": dict(method="none"),
    "ef_signsgd": dict(method="ef_signsgd"),
    "signum": dict(method="signum"),
    "ssdm l2 (paper)": dict(method="ssdm", lr=0.03, options=(("norm_type", "l2"),)),
    "ssdm linf": dict(method="ssdm", options=(("norm_type", "linf"),)),
}


def exp_heterogeneity(st: Settings) -> Finding:
    """Label-sorted shards (each rank sees ~2.5 of the 10 classes) against i.i.d. shards."""
    rows, acc = [], {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    x = list(range(1, st.epochs + 1))
    for label, cfg in HETERO_METHODS.items():
        for shards, ax in zip(("iid", "sorted"), axes):
            rs = digits_seeds(st, shards=shards, **cfg)
            acc[label, shards] = final(rs)
            band(ax, x, [r["test_acc"] for r in rs], label)
        gap = mean(acc[label, "iid"]) - mean(acc[label, "sorted"])
        rows.append((label, fmt_spread(acc[label, "iid"]), fmt_spread(acc[label, "sorted"]),
                     f"{100 * gap:+.1f}"))
        print(f"  {label:16s} iid {fmt_spread(acc[label, 'iid'])}  "
              f"sorted {fmt_spread(acc[label, 'sorted'])}  drop {100 * gap:+.1f} points")
    for ax, shards in zip(axes, ("i.i.d. shards", "label-sorted shards")):
        ax.set_title(f"{shards}, 4 ranks")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].set_ylim(0, 1)
    axes[1].legend(fontsize=8)

    def drop(label):
        return mean(acc[label, "iid"]) - mean(acc[label, "sorted"])
    sign_ok = all(drop(k) > 0.10 for k in ("signum", "ssdm l2 (paper)", "ssdm linf"))
    dense_ok = drop("none") < 0.05 and drop("ef_signsgd") < 0.05
    return Finding(
        "heterogeneity", "9.4", "Heterogeneous (label-sorted) shards",
        "on label-sorted digits shards, majority vote (signum) and SSDM plateau well below their "
        "i.i.d. accuracy, while full precision and EF-signSGD do not",
        sign_ok and dense_ok,
        "accuracy drop i.i.d. -> sorted: "
        + ", ".join(f"{k} {100 * drop(k):+.1f}" for k in HETERO_METHODS) + " points",
        ["Criteria: signum and both ssdm variants lose more than 10 points, none and ef_signsgd "
         f"less than 5. 4 ranks, {st.epochs} epochs, {len(st.seeds)} seed(s); lr/momentum from "
         "train_digits.DEFAULTS except ssdm with the l2 norm (lr 0.03, the best constant lr of "
         "the 9.5 grid; the DEFAULTS lr is for the linf default). Final test accuracy, mean "
         "(min-max).", ""]
        + md_table(("method", "i.i.d.", "label-sorted", "drop (points)"), rows)
        + ["", "The deterministic 1-D instance of section 3.4 is tests/unit/test_sign_methods.py"
               "::test_heterogeneous_1d_instance_*; the section 3.5(b) quadratic is "
               "::test_ssdm_stalls_on_heterogeneous_shards."],
        save(fig, st, "heterogeneity.png"))


# --- 9.5 SSDM on homogeneous data -----------------------------------------------------------------

# Learning-rate grids, the best (lowest mean final training loss) of each is plotted. The
# schedule is the paper's: 1 - beta_k = 1/sqrt(k+1), lr_k = lr_0 (k+1)^(-3/4).
SSDM_GRID = {
    ("l2", False): (0.01, 0.03, 0.1),       # the paper's operator, beta 0.9
    ("l2", True): (0.05, 0.2, 0.5),
    ("linf", False): (0.01, 0.03, 0.1),     # our default operator (norm_type="linf")
    ("linf", True): (0.2, 0.5, 1.0),
}
SIGNUM_GRID = (0.001, 0.002, 0.005, 0.01)
def ssdm_config(norm, schedule, lr):
    opts = (("beta", "schedule"), ("norm_type", norm)) if schedule else (("norm_type", norm),)
    return dict(method="ssdm", lr=lr, ssdm_schedule=schedule, options=opts)


def best_of(st, grid_configs):
    """{lr: runs over seeds} for each config of a grid, and the lr with the lowest mean final
    training loss."""
    runs = {lr: digits_seeds(st, **cfg) for lr, cfg in grid_configs.items()}
    best = min(runs, key=lambda lr: mean(final(runs[lr], "train_loss")))
    return runs, best


def exp_ssdm(st: Settings) -> Finding:
    """SSDM on i.i.d. digits shards against Signum, same number of steps, lr tuned per variant."""
    variants = {"signum": best_of(st, {lr: dict(method="signum", lr=lr)
                                        for lr in st.grid(SIGNUM_GRID)})}
    for (norm, schedule), grid in SSDM_GRID.items():
        label = f"ssdm {norm}, " + ("schedule" if schedule else "beta 0.9")
        variants[label] = best_of(st, {lr: ssdm_config(norm, schedule, lr)
                                       for lr in st.grid(grid)})
    rows = []
    for label, (runs, best) in variants.items():
        for lr, rs in runs.items():
            half = [r["train_loss"][len(r["train_loss"]) // 2 - 1] for r in rs]
            mark = " (best)" if lr == best else ""
            rows.append((label, f"{lr}{mark}", fmt_spread([r["train_loss"][0] for r in rs]),
                         fmt_spread(half), fmt_spread(final(rs, "train_loss")),
                         fmt_spread(final(rs))))
        rs = runs[best]
        print(f"  {label:24s} best lr {best}: train loss "
              f"{fmt_spread([r['train_loss'][0] for r in rs])} -> "
              f"{fmt_spread(final(rs, 'train_loss'))}, test acc {fmt_spread(final(rs))}")

    def decreasing(rs):
        # "keeps decreasing": the loss at the end is below the loss at mid-run, on every seed
        return all(r["train_loss"][-1] < r["train_loss"][len(r["train_loss"]) // 2 - 1]
                   for r in rs)

    def best_loss(label):
        runs, best = variants[label]
        return mean(final(runs[best], "train_loss"))
    paper = "ssdm l2, schedule"
    converges = decreasing(variants[paper][0][variants[paper][1]])
    slower = best_loss(paper) > best_loss("signum")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = list(range(1, st.epochs + 1))
    for label, (runs, best) in variants.items():
        band(ax, x, [r["train_loss"] for r in runs[best]], f"{label} (lr {best})",
             linestyle="--" if "schedule" in label else "-")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (same steps for every method)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training loss (full training set)")
    ax.set_title("SSDM vs Signum, i.i.d. digits shards, 4 ranks")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return Finding(
        "ssdm", "9.5", "SSDM on homogeneous data",
        "with i.i.d. shards SSDM converges (the training loss keeps decreasing with the "
        "k^(-3/4) schedule) and is somewhat slower than Signum per step",
        converges and slower,
        f"paper's SSDM (l2 norm, schedule): loss still decreasing in the second half on every "
        f"seed: {converges}; final training loss {best_loss(paper):.3f} vs Signum "
        f"{best_loss('signum'):.3f}, {best_loss(paper) / best_loss('signum'):.0f}x higher: "
        + ("far more than 'somewhat' slower" if best_loss(paper) > 3 * best_loss("signum")
           else "slower" if slower else "not slower")
        + f" (with our linf norm: {best_loss('ssdm linf, schedule'):.3f})",
        ["4 ranks, i.i.d. shards, training loss on the whole training set, mean (min-max) over "
         "seeds; 'mid' is after half the epochs. lr tuned per variant on the grid shown (best = "
         "lowest mean final training loss). The verdict uses the paper's operator (l2 norm) with "
         "its schedule; norm_type='linf' (this package's default) is shown for comparison: the "
         "same direction in expectation, with each probability far from 1/2, so much less "
         "variance on a model of ~26k coordinates.", ""]
        + md_table(("variant", "lr", "loss epoch 1", "loss mid", "final loss", "test acc"), rows)
        + ["", "The section 3.5(b) quadratic is tests/unit/test_sign_methods.py::"
               "test_ssdm_converges_on_homogeneous_shards."],
        save(fig, st, "ssdm_homogeneous.png"))


# --- logistic regression (9.6, 9.7) ---------------------------------------------------------------

class LogReg:
    """Binary logistic regression on Gaussian features with noisy linear labels, sharded over
    ranks (i.i.d.). f* comes from full-batch L-BFGS in float64."""

    def __init__(self, n=2000, d=30, ranks=4, seed=0, l2=0.0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=gen)
        w_true = 2.0 * torch.randn(d, generator=gen) / math.sqrt(d)
        prob = torch.sigmoid(self.x @ w_true)
        self.y = (torch.rand(n, generator=gen) < prob).float()   # noisy labels: not separable
        self.d, self.ranks, self.l2 = d, ranks, l2
        self.shards = [torch.arange(r, n, ranks) for r in range(ranks)]
        self.f_star = self._solve()

    def loss(self, w):
        x, y = self.x.to(w.dtype), self.y.to(w.dtype)
        return float(F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * self.l2 * (w @ w))

    def grad(self, w, idx):
        x = self.x[idx]
        return x.T @ (torch.sigmoid(x @ w) - self.y[idx]) / len(idx) + self.l2 * w

    def _solve(self):
        w = torch.zeros(self.d, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=1e-15, line_search_fn="strong_wolfe")
        x, y = self.x.double(), self.y.double()

        def closure():
            opt.zero_grad()
            f = F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * self.l2 * (w @ w)
            f.backward()
            return f
        opt.step(closure)
        return self.loss(w.detach())

    def train(self, method, lr, steps, batch, seed=0, options=None, trace=None):
        """Simulated data-parallel SGD: every rank samples its own mini-batch from its shard
        (batch=None: the whole shard, a deterministic gradient); the method's aggregate is the
        update direction, x <- x - lr * update."""
        gen = torch.Generator().manual_seed(1000 + seed)
        sim = Simulation(method, self.ranks, [self.d], seed=seed, **(options or {}))
        w = torch.zeros(self.d)
        for k in range(steps):
            grads = [self.grad(w, s if batch is None else
                               s[torch.randint(len(s), (batch,), generator=gen)])
                     for s in self.shards]
            w -= lr * sim.step(grads)[:self.d]
            if trace is not None:
                trace(k, w, sim)
        return w, sim


# --- 9.6 EF fixes signSGD -------------------------------------------------------------------------

def exp_ef(st: Settings) -> Finding:
    """EF-signSGD vs SGD vs signSGD (vote): synthetic logistic regression, then digits."""
    prob = LogReg(n=2000, d=30, ranks=4, seed=0)
    steps, batch = (300, 8) if st.quick else (2000, 8)
    grids = {"none": (0.01, 0.03, 0.1, 0.3), "ef_signsgd": (0.01, 0.03, 0.1, 0.3),
             "signsgd": (0.0003, 0.001, 0.003, 0.01)}
    names = {"none": "SGD", "ef_signsgd": "EF-signSGD", "signsgd": "signSGD (vote)"}
    rows, best = [], {}
    for method, grid in grids.items():
        per_lr = {lr: [prob.loss(prob.train(method, lr, steps, batch, seed=s)[0])
                       for s in st.seeds] for lr in st.grid(grid)}
        lr = min(per_lr, key=lambda k: mean(per_lr[k]))    # lr tuned per method, as the paper
        best[method] = per_lr[lr]
        rows.append((names[method], lr, fmt_spread(per_lr[lr], 4),
                     fmt_spread([f - prob.f_star for f in per_lr[lr]], 4),
                     ", ".join(f"{g}: {mean(v):.4f}" for g, v in per_lr.items())))
        print(f"  logreg {names[method]:15s} best lr {lr}: loss {fmt_spread(per_lr[lr], 4)}")
    lr_sgd = mean(best["none"])
    lr_ok = (mean(best["ef_signsgd"]) - lr_sgd < 0.25 * (mean(best["signsgd"]) - lr_sgd)
             and mean(best["signsgd"]) > lr_sgd)

    # Digits: lr tuned per method on a grid (lowest mean final training loss), momentum as the
    # paper compares them: SGD with momentum 0.9, EF-signSGD and signSGD without.
    dgrids = {"none": (0.9, (0.03, 0.1, 0.3)), "ef_signsgd": (0.0, (0.2, 0.5, 1.0)),
              "signsgd": (0.0, (0.001, 0.002, 0.005))}
    dig, drows = {}, []
    for m, (mom, grid) in dgrids.items():
        runs, lr = best_of(st, {lr: dict(method=m, lr=lr, momentum=mom)
                                for lr in st.grid(grid)})
        dig[m] = runs[lr]
        drows.append((names[m], f"{lr} / {mom}", fmt_spread(final(runs[lr], "train_loss"), 4),
                      fmt_spread(final(runs[lr])),
                      ", ".join(f"{g}: {mean(final(v)):.3f}" for g, v in runs.items())))
        print(f"  digits {names[m]:15s} best lr {lr}: train loss "
              f"{fmt_spread(final(runs[lr], 'train_loss'), 4)}, test acc "
              f"{fmt_spread(final(runs[lr]))}")
    acc = {m: mean(final(rs)) for m, rs in dig.items()}
    dig_ok = acc["ef_signsgd"] > acc["none"] - 0.02 and acc["signsgd"] < acc["ef_signsgd"]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in grids:
        lr = [r[1] for r in rows if r[0] == names[method]][0]
        curve = []

        def trace(k, w, sim, curve=curve):
            if k % 10 == 0:
                curve.append(prob.loss(w) - prob.f_star)
        prob.train(method, lr, steps, batch, seed=st.seeds[0], trace=trace)
        axes[0].plot(range(0, steps, 10), curve, label=f"{names[method]} (lr {lr})")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("f(w) - f*")
    axes[0].set_title("logistic regression N=2000, d=30, 4 ranks, batch 8")
    x = list(range(1, st.epochs + 1))
    for m, rs in dig.items():
        band(axes[1], x, [r["test_acc"] for r in rs], names[m])
    axes[1].set_xlabel("epoch")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_ylabel("test accuracy")
    axes[1].set_title("digits MLP, 4 ranks")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return Finding(
        "ef", "9.6", "Error feedback fixes signSGD",
        "EF-signSGD matches SGD's training loss (synthetic logistic regression) and test "
        "accuracy (digits); plain signSGD is worse",
        lr_ok and dig_ok,
        f"logistic regression f - f*: SGD {lr_sgd - prob.f_star:.4f}, EF-signSGD "
        f"{mean(best['ef_signsgd']) - prob.f_star:.4f}, signSGD "
        f"{mean(best['signsgd']) - prob.f_star:.4f} (f* = {prob.f_star:.4f}); digits test acc: "
        f"SGD {acc['none']:.3f}, EF-signSGD {acc['ef_signsgd']:.3f}, signSGD {acc['signsgd']:.3f}",
        [f"Logistic regression: N = 2000, d = 30, 4 ranks, batch {batch} per rank, {steps} "
         f"steps, constant lr tuned per method on the grid shown (best mean final loss), "
         f"{len(st.seeds)} seed(s). Criteria: EF-signSGD closes at least 3/4 of the gap between "
         f"signSGD and SGD; on digits EF-signSGD is within 2 points of SGD and signSGD is below "
         f"EF-signSGD.", ""]
        + md_table(("method", "best lr", "final loss", "f - f*", "mean loss per lr"), rows)
        + ["", f"Digits MLP, 4 ranks, {st.epochs} epochs, lr tuned per method on the grid shown "
               f"(lowest mean final training loss):", ""]
        + md_table(("method", "lr / momentum", "final training loss", "test accuracy",
                    "test accuracy per lr"), drows)
        + ["", "The section 4 counterexample is tests/unit/test_sign_methods.py::"
               "test_signsgd_counterexample_never_converges / "
               "::test_ef_signsgd_counterexample_converges."],
        save(fig, st, "ef_signsgd.png"))


# --- 9.7 hard threshold vs Top-k ------------------------------------------------------------------

# Stochastic gradients (batch 32 per rank) and an lr at which every budget converges towards
# f*; a larger lr (0.5) leaves the 0.5% run above its starting loss, which says nothing about
# either compressor.
THRESHOLD_SETUP = dict(n=2000, d=500, steps=1000, batch=32, lr=0.1)


def below_one(x):
    """max |e| / lambda, written so that 'just below 1' does not round to 1."""
    return f"1 - {1 - x:.1e}" if x < 1 else f"{x:.8f} (VIOLATED)"


def exp_threshold(st: Settings) -> Finding:
    """EF + Top-k at ratios 0.5/1/5% against EF + hard threshold with lambda chosen so that the
    total number of sent elements matches, on logistic regression."""
    setup = dict(THRESHOLD_SETUP, **({"steps": 100} if st.quick else {}))
    prob = LogReg(n=setup["n"], d=setup["d"], ranks=4, seed=1, l2=1e-3)
    steps, batch, lr = setup["steps"], setup["batch"], setup["lr"]
    ratios = (0.01,) if st.quick else (0.005, 0.01, 0.05)

    def run(method, options, seed, keep_trace=False):
        trace = {"loss": [], "bits": [], "err_inf": [], "err_l2": []}

        def rec(k, w, sim):
            if keep_trace:
                e = sim.states[0]["error"]
                trace["err_inf"].append(float(e.abs().max()))
                trace["err_l2"].append(float(e.norm()))
                if k % 10 == 0 or k == steps - 1:
                    trace["loss"].append(prob.loss(w) - prob.f_star)
                    trace["bits"].append(8 * sim.bytes_sent[0])
            elif options.get("lam") is not None:     # the invariant on every rank, every step
                lam = options["lam"]
                trace["err_inf"].append(max(float(s["error"].abs().max()) for s in sim.states)
                                        / lam)
        w, sim = prob.train(method, lr, steps, batch, seed=seed, options=options, trace=rec)
        return prob.loss(w) - prob.f_star, sum(sim.bytes_sent), trace

    rows, results = [], []
    for ratio in ratios:
        topk = [run("topk", {"ratio": ratio}, s) for s in st.seeds]
        target = mean(t[1] for t in topk)
        # lambda with the same total bytes (seed 0): the count falls as lambda grows, roughly
        # as a power law, so a secant on log-log scale converges in a few runs.
        lo_hi, lam = [], 0.5 / math.sqrt(ratio * prob.d)
        for _ in range(3 if st.quick else 12):
            sent = run("threshold", {"lam": lam, "max_density": 1.0}, st.seeds[0])[1]
            lo_hi.append((math.log(lam), math.log(sent)))
            if abs(sent / target - 1) < 0.01:
                break
            if len(lo_hi) == 1:
                lam *= (sent / target) ** 0.5
            else:
                (a0, b0), (a1, b1) = lo_hi[-2], lo_hi[-1]
                slope = (b1 - b0) / (a1 - a0) if a1 != a0 and b1 != b0 else -1.0
                lam = math.exp(a1 + (math.log(target) - b1) / min(slope, -0.1))
        thr = [run("threshold", {"lam": lam, "max_density": 1.0}, s) for s in st.seeds]
        inv = max(max(t[2]["err_inf"]) for t in thr)
        results.append((ratio, lam, topk, thr, inv))
        diff = mean(t[0] for t in thr) / mean(t[0] for t in topk) - 1
        rows.append((f"{100 * ratio:g}%", f"{lam:.4g}", fmt_spread([t[0] for t in topk], 5),
                     fmt_spread([t[0] for t in thr], 5), f"{100 * diff:+.1f}%",
                     f"{mean(t[1] for t in thr) / target:.3f}", below_one(inv)))
        print(f"  top-k {100 * ratio:g}%: f-f* {fmt_spread([t[0] for t in topk], 5)}; threshold "
              f"lam={lam:.4g}: f-f* {fmt_spread([t[0] for t in thr], 5)} (bytes ratio "
              f"{mean(t[1] for t in thr) / target:.3f}, max |e|/lam {below_one(inv)})")
    better = sum(mean(t[0] for t in thr) < mean(t[0] for t in topk)
                 for _, _, topk, thr, _ in results)
    invariant = all(inv < 1.0 for *_, inv in results)
    ok = better == len(results) and invariant

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (ratio, lam, *_rest) in zip(colors, results):
        tk = run("topk", {"ratio": ratio}, st.seeds[0], keep_trace=True)[2]
        th = run("threshold", {"lam": lam, "max_density": 1.0}, st.seeds[0], keep_trace=True)[2]
        axes[0].plot([b / 1e6 for b in tk["bits"]], tk["loss"], color=c, linestyle="--",
                     label=f"top-k {100 * ratio:g}%")
        axes[0].plot([b / 1e6 for b in th["bits"]], th["loss"], color=c,
                     label=f"threshold {lam:.3g}")
        axes[1].plot(tk["err_l2"], color=c, linestyle="--", label=f"top-k {100 * ratio:g}%")
        axes[1].plot(th["err_l2"], color=c, label=f"threshold {lam:.3g}")
    axes[0].set_xlabel("Mbit sent by rank 0")
    axes[0].set_ylabel("f(w) - f*")
    axes[0].set_yscale("log")
    axes[0].set_title("suboptimality vs bits (EF, 4 ranks)")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("‖e‖₂ of rank 0")
    axes[1].set_yscale("log")
    axes[1].set_title("error-memory norm")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return Finding(
        "threshold", "9.7", "Hard threshold vs Top-k at equal total bits",
        "at equal total transmitted elements the hard-threshold run reaches a lower loss than "
        "Top-k, and its ‖e‖∞ < λ invariant holds throughout",
        ok, f"threshold lower than Top-k in {better}/{len(results)} budgets ("
            + ", ".join(r[4] for r in rows) + " in f - f*); invariant "
            + ("holds" if invariant else "VIOLATED") + ": max ‖e‖∞/λ over all ranks and steps = "
            + below_one(max(r[4] for r in results)),
        [f"Logistic regression N = {prob.x.shape[0]}, d = {prob.d} (one tensor: layer-wise "
         f"Top-k is global Top-k), l2 1e-3, "
         f"4 ranks, batch {batch}, lr {lr}, {steps} steps, {len(st.seeds)} seed(s); lambda "
         f"matched on seed {st.seeds[0]} so that the total bytes sent equal Top-k's "
         f"(the bytes ratio column, threshold/Top-k, averaged over seeds). "
         f"max_density=1 (no dense fallback).", ""]
        + md_table(("Top-k ratio", "lambda", "Top-k f - f*", "threshold f - f*",
                    "threshold vs Top-k", "bytes ratio", "max ‖e‖∞ / λ"), rows),
        save(fig, st, "threshold_vs_topk.png"))


# --- 9.8 saddle escape ----------------------------------------------------------------------------

def exp_saddle(st: Settings) -> Finding:
    """f(x, y) = x^2/2 + y^4/4 - y^2/2 from (1, 0), 2 ranks, EF with Top-1 or Random-1."""
    steps = 300 if st.quick else 3000

    def run(method, noise, seed, lr=0.1):
        sim = Simulation(method, 2, [2], seed=seed, k=1, noise=noise)
        z = torch.tensor([1.0, 0.0])
        for _ in range(steps):
            g = torch.stack([z[0], z[1] ** 3 - z[1]])
            z = z - lr * sim.step([g, g.clone()])[:2]
        return z, float(0.5 * z[0] ** 2 + 0.25 * z[1] ** 4 - 0.5 * z[1] ** 2)

    seeds = st.seeds if st.quick else (0, 1, 2, 3, 4)
    rows, ok = [], True
    traces = {}
    for method in ("topk", "randomk"):
        for noise in (0.0, 0.01):
            res = [run(method, noise, s) for s in seeds]
            fs = [f for _, f in res]
            want = 0.0 if noise == 0 else -0.25
            ok &= all(abs(f - want) < 1e-3 for f in fs)
            rows.append((method, noise, ", ".join(f"({float(z[0]):.3f}, {float(z[1]):.3f})"
                                                  for z, _ in res),
                         ", ".join(f"{f:.4f}" for f in fs)))
            traces[method, noise] = fs
            print(f"  {method:8s} noise {noise}: f = {', '.join(f'{f:.4f}' for f in fs)}")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    labels = [f"{m}\nnoise {n}" for m, n in traces]
    for i, fs in enumerate(traces.values()):
        ax.scatter([i] * len(fs), fs, s=30)
    ax.axhline(0.0, color="gray", linestyle=":", label="saddle f = 0")
    ax.axhline(-0.25, color="k", linestyle="--", label="minima f = -0.25")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("final f")
    ax.set_title(f"EF + 1-of-2 compressor, 2 ranks, {steps} steps")
    ax.legend(fontsize=8)
    return Finding(
        "saddle", "9.8", "Saddle escape needs noise",
        "without noise EF + Top-1 (and Random-1) converges to the strict saddle (f = 0); with "
        "per-rank noise r = 0.01 every run ends at a minimum (f = -0.25)",
        ok, "final f: " + "; ".join(f"{m} noise {n}: " + ", ".join(f"{f:.3f}" for f in fs)
                                    for (m, n), fs in traces.items()),
        [f"2 ranks, each adding its own noise (noise_seed='rank'), lr 0.1, {steps} steps, "
         f"{len(seeds)} seeds.", ""]
        + md_table(("method", "noise r", "final (x, y) per seed", "final f per seed"), rows),
        save(fig, st, "saddle_escape.png"))


# --- 9.9 ECX --------------------------------------------------------------------------------------

def exp_ecx(st: Settings) -> Finding:
    """Section 7(b) quadratic with 4 ranks, then the digits MLP with momentum 0.95."""
    alpha = 0.05
    h = torch.linspace(0.1, 10, 100)

    def quad(method, lr, steps=3000, **opts):
        torch.manual_seed(0)
        sim = Simulation(method, 4, [100], **opts)
        x, v = torch.ones(100), torch.zeros(100)
        for _ in range(steps):
            u = sim.step([h * x + torch.randn(100) for _ in range(4)])[:100]
            v = (1 - alpha) * v + alpha * u
            x = x - lr * v
            if not torch.isfinite(x).all() or float(x.abs().max()) > 1e15:
                return float("inf")
        return 0.5 * float((h * x * x).sum())

    variants = {"exact (none)": ("none", {}),
                "ECX": ("ecx", {"alpha": alpha, "compensation": "ecx"}),
                "single-step EC": ("ecx", {"alpha": alpha, "compensation": "single"}),
                "no compensation": ("ecx", {"alpha": alpha, "compensation": "none"})}
    qsteps = 200 if st.quick else 3000
    q = {(name, lr): quad(m, lr, qsteps, **o) for name, (m, o) in variants.items()
         for lr in (0.02, 0.005)}
    # The Top-k instability (ALGORITHMS.md section 7): ecx refuses sparse compressors; its
    # private _allow_sparse switch exists only to reproduce this divergence.
    try:
        q["ECX + Top-k 10%", 0.02] = quad("ecx", 0.02, qsteps, alpha=alpha, compressor="topk",
                                          ratio=0.1, _allow_sparse=True)
        q["single-step EC + Top-k 10%", 0.02] = quad("topk", 0.02, qsteps, ratio=0.1)
    except (ValueError, TypeError) as e:
        print(f"  (Top-k variant not run: {e})")
    qrows = [(name, f"{q.get((name, 0.02), float('nan')):.4g}",
              f"{q[name, 0.005]:.4g}" if (name, 0.005) in q else "-")
             for name in dict.fromkeys(k for k, _ in q)]
    for r in qrows:
        print(f"  quadratic {r[0]:28s} f(lr 0.02) = {r[1]:>10s}  f(lr 0.005) = {r[2]}")
    quad_ok = (q["ECX", 0.02] < 1.1 * q["exact (none)", 0.02]
               and q["single-step EC", 0.02] > 10 * q["ECX", 0.02]
               and abs(q["ECX", 0.005] - q["exact (none)", 0.005]) < 0.2 * q["exact (none)", 0.005])

    # Digits: SGD(momentum 1 - alpha, dampening 1 - alpha) is v <- (1-alpha) v + alpha u.
    dlrs = (0.3,) if st.quick else (0.3, 1.0)
    dig = {}
    for lr in dlrs:
        for name, (m, o) in variants.items():
            dig[name, lr] = digits_seeds(st, method=m, lr=lr, momentum=1 - alpha,
                                         dampening=1 - alpha, options=tuple(sorted(o.items())))
    drows = []
    for (name, lr), rs in dig.items():
        div = sum(r["diverged"] for r in rs)
        drows.append((name, lr, fmt_spread(final(rs)), fmt_spread(final(rs, "train_loss"), 4),
                      f"{div}/{len(rs)}"))
        print(f"  digits {name:18s} lr {lr}: test acc {fmt_spread(final(rs))}, "
              f"train loss {fmt_spread(final(rs, 'train_loss'), 4)}, diverged {div}/{len(rs)}")
    acc = {k: mean(final(v)) for k, v in dig.items()}
    dig_ok = all(acc["ECX", lr] > acc["exact (none)", lr] - 0.03 for lr in dlrs)
    fig, axes = plt.subplots(1, len(dlrs), figsize=(5 * len(dlrs), 4), squeeze=False)
    x = list(range(1, st.epochs + 1))
    for ax, lr in zip(axes[0], dlrs):
        for name in variants:
            band(ax, x, [r["test_acc"] for r in dig[name, lr]], name)
        ax.set_title(f"digits, momentum 0.95, lr {lr}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return Finding(
        "ecx", "9.9", "ErrorCompensatedX vs single-step compensation",
        "ECX tracks the uncompressed momentum run; single-step EC lags or diverges at the larger "
        "step size (section 7(b) quadratic: exact 0.120, ECX 0.123, single-step diverges, none "
        "0.134 at lr 0.02; compensated variants = exact 0.032 at lr 0.005)",
        quad_ok and dig_ok,
        f"quadratic part {verdict_word(quad_ok)}, digits part {verdict_word(dig_ok)}. "
        f"Quadratic lr 0.02: exact {q['exact (none)', 0.02]:.4g}, ECX {q['ECX', 0.02]:.4g}, "
        f"single {q['single-step EC', 0.02]:.4g}, none {q['no compensation', 0.02]:.4g}; digits "
        + ", ".join(f"lr {lr}: ECX {acc['ECX', lr]:.3f} vs exact {acc['exact (none)', lr]:.3f} vs "
                    f"single {acc['single-step EC', lr]:.3f}" for lr in dlrs),
        [f"Quadratic: d = 100, h = linspace(0.1, 10), 4 ranks, noise N(0,1), alpha {alpha}, "
         f"{qsteps} steps, seed 0, final f (inf: diverged).", ""]
        + md_table(("variant", "f, lr 0.02", "f, lr 0.005"), qrows)
        + ["", f"Digits MLP, 4 ranks, SGD(momentum=0.95, dampening=0.95), {st.epochs} epochs, "
               f"{len(st.seeds)} seed(s). Criteria: on the quadratic ECX within 10% of exact and "
               f"single-step EC 10x worse at lr 0.02, ECX within 20% of exact at lr 0.005; on "
               f"digits ECX within 3 points of exact at every lr.", ""]
        + md_table(("variant", "lr", "test accuracy", "training loss", "diverged"), drows)
        + [""] + [f"At lr {lr}: ECX {acc['ECX', lr]:.3f} "
                  f"{'above' if acc['ECX', lr] > acc['single-step EC', lr] else 'below'} "
                  f"single-step EC ({acc['single-step EC', lr]:.3f}) and "
                  f"{'above' if acc['ECX', lr] > acc['no compensation', lr] else 'below'} "
                  f"no compensation ({acc['no compensation', lr]:.3f}); exact "
                  f"{acc['exact (none)', lr]:.3f}." for lr in dlrs],
        save(fig, st, "ecx.png"))


# --- driver ---------------------------------------------------------------------------------------

EXPERIMENTS = {
    # name: (function, methods it needs in hvd_signsgd.METHODS)
    "vote_noise": (exp_vote_noise, ("signsgd",)),
    "fault_tolerance": (exp_fault_tolerance, ("signum", "none")),
    "heterogeneity": (exp_heterogeneity, ("none", "ef_signsgd", "signum", "ssdm")),
    "ssdm": (exp_ssdm, ("ssdm", "signum")),
    "ef": (exp_ef, ("none", "ef_signsgd", "signsgd")),
    "threshold": (exp_threshold, ("topk", "threshold")),
    "saddle": (exp_saddle, ("topk", "randomk")),
    "ecx": (exp_ecx, ("ecx", "none")),
}
SECTIONS = {"vote_noise": "9.1", "fault_tolerance": "9.3", "heterogeneity": "9.4",
            "ssdm": "9.5", "ef": "9.6", "threshold": "9.7", "saddle": "9.8", "ecx": "9.9"}


def write_report(findings, st, path):
    lines = ["# Small-scale reproduction of ALGORITHMS.md section 9", "",
             "Generated by `python examples/reproduce_paper.py"
             + (" --quick` (smoke run: too short for the numbers to mean anything)" if st.quick
                else "`") + ". Multi-rank runs are simulated in one process with the real codecs "
             "and aggregation (hvd_signsgd.simulate); the digits runs are step-for-step the "
             "training of examples/train_digits.py. Spreads are (min-max) over seeds "
             f"{list(st.seeds)}. Section 9.2 (Signum + vote vs full precision) is the table of "
             "examples/compare_methods.py (compare_methods.md).", "",
             "| section | experiment | verdict | measured |", "|---|---|---|---|"]
    for f in findings:
        lines.append(f"| {f.section} | [{f.title}](#{f.key}) | **{verdict_word(f.confirmed)}** "
                     f"| {f.verdict} |")
    for f in findings:
        lines += ["", f'<a id="{f.key}"></a>', f"## {f.section} {f.title}", "",
                  f"Claim: {f.claim}.", "", f"Verdict: **{verdict_word(f.confirmed)}**. "
                  f"{f.verdict}", ""] + f.lines
        if f.figure:
            lines += ["", f"![{f.title}]({f.figure})"]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", choices=sorted(EXPERIMENTS),
                   help="run only this experiment (repeatable)")
    p.add_argument("--quick", action="store_true", help="smoke version: 1 seed, 2 epochs")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="digits epochs (default 12)")
    p.add_argument("--outdir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    n_seeds = args.seeds or (1 if args.quick else 3)
    st = Settings(quick=args.quick, outdir=args.outdir, seeds=tuple(range(n_seeds)),
                  epochs=args.epochs or (2 if args.quick else 12))
    st.outdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    findings, t_all = [], time.time()
    for name in args.only or EXPERIMENTS:
        fn, needs = EXPERIMENTS[name]
        missing = [m for m in needs if m not in METHODS]
        print(f"== {SECTIONS[name]} {name}", flush=True)
        if missing:
            msg = (f"requires method(s) {', '.join(missing)} in hvd_signsgd.METHODS "
                   f"(registered: {', '.join(METHODS)})")
            print(f"  skipped: {msg}")
            findings.append(Finding(name, SECTIONS[name], name, "-", None, msg))
            continue
        t0 = time.time()
        f = fn(st)
        print(f"  -> {verdict_word(f.confirmed)}: {f.verdict}  [{time.time() - t0:.0f} s]",
              flush=True)
        findings.append(f)
    out = st.outdir / "paper_reproduction.md"
    write_report(findings, st, out)
    print(f"wrote {out} [{time.time() - t_all:.0f} s in all]")
    return findings


if __name__ == "__main__":
    main()
