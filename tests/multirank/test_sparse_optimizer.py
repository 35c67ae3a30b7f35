"""Sparsifiers, perturbation and ErrorCompensatedX under real mpirun / horovodrun --gloo jobs
(issue 5; ALGORITHMS.md sections 5-9). Toy experiments with thousands of steps run in
simulation in tests/unit/test_sparse_methods.py; here: what needs real processes."""
import json
import math

import pytest
from harness import ROOT

# name -> (method, options); every rank runs all of them in one job, 50 steps each. The
# dense ones keep the pairs' allgather (exchange="allgather"): exchange="auto" would send them
# as a dense allreduce (test_sparse_dense.py).
CONFIGS = {
    "topk": ("topk", {}),
    "topk_bucket_fp16": ("topk", {"ratio": 0.05, "scope": "bucket", "values": "fp16"}),
    "threshold": ("threshold", {"lam": 0.03, "exchange": "allgather"}),
    "threshold_all": ("threshold", {"lam": 1e-12, "max_density": 1.0,
                                    "exchange": "allgather"}),
    "randomk": ("randomk", {"ratio": 0.05}),
    "ecx": ("ecx", {}),
    "ecx_single": ("ecx", {"compensation": "single"}),
    "topk_perturbed": ("topk", {"ratio": 0.02, "noise": 0.01, "reset_every": 7,
                                "exchange": "allgather"}),
    "randomk_perturbed": ("randomk", {"noise": 0.01, "noise_seed": "shared",
                                      "reset_every": 9}),
}

BIT_IDENTICAL = """
import hashlib, torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import SGD_SETTINGS, small_model, batch, digest
hvd.init()
rank, size = hvd.rank(), hvd.size()
out = {}
for name, (method, options) in CONFIGS.items():
    model = small_model()
    before = digest(model)
    opt = torch.optim.SGD(model.parameters(), **SGD_SETTINGS[method])
    opt = hvd_signsgd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                           method=method, min_compress_numel=100, seed=3,
                                           **options)
    (bucket,) = [b for b in opt._buckets if b.method is opt.method]
    steps = []
    for k in range(50):
        # rank k % size has a zero gradient (threshold: sends nothing); for threshold, every
        # 5th step the next rank's gradient is 20x (more than half its coordinates pass lam:
        # a dense fallback)
        scale = 0.0 if rank == k % size else 1.0
        if method == "threshold" and k % 5 == 0 and rank == (k + 1) % size:
            scale = 20.0
        x, y = batch(k, rank)
        opt.zero_grad()
        (scale * torch.nn.functional.cross_entropy(model(x), y)).backward()
        opt.step()
        s = opt.compression_stats()
        rec = {key: s.get(key, 0) for key in ("bytes_sent", "bytes_received", "nnz_sent",
                                               "dense_fallbacks", "error_resets")}
        if method == "threshold":
            rec["max_error"] = float(bucket.state["error"].abs().max())
        if method == "randomk":
            rec["indices"] = hashlib.sha256(
                bucket.method.indices(bucket.ctx).numpy().tobytes()).hexdigest()
        steps.append(rec)
    out[name] = {"digest": digest(model), "changed": digest(model) != before,
                 "steps": steps, "stats": opt.compression_stats()}
report(out)
""".replace("CONFIGS.items()", repr(CONFIGS) + ".items()")

# rankcommon.small_model: compressed bucket = the 47x5 and 33x47 weights (235 at 0, 1551 at 240:
# 1791 elements, 1786 real); the biases (5 + 47, at 0 and 8) go dense: 55 float32 = 220 bytes.
N_BUCKET, N_REAL, DENSE = 1791, 1786, 220


def round4(n):
    return (n + 3) // 4 * 4


def payload_bytes(name, rec, np, all_zero=False):
    """The compressed bucket's payload of one rank in one step, from the codec formulas.
    all_zero: the rank's first step with a zero gradient, where ecx (a sign codec) has nothing
    but zeros to send: its payload is the header and the scales (sign(0) = 0, wire.py).
    randomk's allreduce carries one float32 status slot per rank after its values."""
    method, options = CONFIGS[name]
    if rec["dense_fallbacks"] or rec["error_resets"]:
        return 4 * (N_BUCKET + np) if method == "randomk" else 16 + 4 * N_BUCKET
    if method == "randomk":
        return 4 * (rec["nnz_sent"] + np)
    if method == "ecx":
        return 16 + 4 * 2 + (0 if all_zero else round4((N_BUCKET + 7) // 8))
    per_pair = 6 if options.get("values") == "fp16" else 8
    return 16 + round4(per_pair * rec["nnz_sent"])


@pytest.mark.parametrize("np", [2, 3, 4])
def test_every_rank_bit_identical_after_50_steps(mpi_job, launcher, np):
    results = mpi_job(BIT_IDENTICAL, np=np, launcher=launcher, timeout=400).ok()
    for name, (method, options) in CONFIGS.items():
        per_rank = [r[name] for r in results]
        assert len({r["digest"] for r in per_rank}) == 1, f"{name}: ranks differ"
        assert per_rank[0]["changed"], f"{name}: parameters never moved"
        for k in range(50):
            recs = [r["steps"][k] for r in per_rank]
            sizes = [payload_bytes(name, rec, np, all_zero=(k == 0 and r == 0))
                     for r, rec in enumerate(recs)]
            size_exchange = 8 if method == "threshold" else 0
            for rank, rec in enumerate(recs):
                assert rec["bytes_sent"] == sizes[rank] + size_exchange + DENSE, (name, k, rank)
                if method == "randomk":          # an allreduce: received = sent
                    others = sizes[rank]
                else:                            # an allgather: the other ranks' payloads
                    others = sum(sizes) - sizes[rank] + size_exchange * (np - 1)
                assert rec["bytes_received"] == others + DENSE, (name, k, rank)
            if method == "topk" and not recs[0]["error_resets"]:
                assert len(set(sizes)) == 1          # fixed by the layout
            if method == "threshold":
                lam = options["lam"]
                assert all(rec["max_error"] < lam for rec in recs), (name, k)
                zero = k % np
                assert recs[zero]["nnz_sent"] == 0 and sizes[zero] == 16, (name, k)
            if name == "threshold" and k % 5 == 0:
                assert recs[(k + 1) % np]["dense_fallbacks"] == 1, k
            if name == "threshold_all":   # every rank with a gradient sends every coordinate
                assert all(recs[r]["nnz_sent"] == N_REAL for r in range(np) if r != k % np), k
            if method == "randomk":
                assert len({rec["indices"] for rec in recs}) == 1, (name, k)
        stats = per_rank[0]["stats"]
        if method == "threshold":
            assert stats["total_size_exchange_bytes"] == 50 * 8 * np
            # the 10 forced ones (over all ranks), and any the larger gradients after them cause
            fallbacks = sum(r["stats"].get("total_dense_fallbacks", 0) for r in per_rank)
            assert (fallbacks >= 10) == (name == "threshold"), (name, fallbacks)
        if name.endswith("perturbed"):
            assert stats["total_error_resets"] == 50 // CONFIGS[name][1]["reset_every"]


ROBUST = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, first_error, batch, resume_roundtrip
hvd.init()
r = hvd.rank()
out = {}
for method, options in (("topk", {}), ("threshold", {"lam": 0.02}),
                        ("randomk", {"noise": 0.01, "reset_every": 6}), ("ecx", {})):
    uninterrupted, resumed, _ = resume_roundtrip(method, 10, r, **options)
    out[method] = {"uninterrupted": uninterrupted, "resumed": resumed}

def nan_step(method, **options):
    model = small_model()
    opt = hvd_signsgd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), named_parameters=model.named_parameters(),
        method=method, min_compress_numel=100, **options)
    x, y = batch(0, r)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    (loss * float("nan") if r == 1 else loss).backward()
    opt.step()
for method in ("topk", "threshold", "randomk"):
    out[f"nan-{method}"] = first_error(lambda: nan_step(method))
out["ecx-topk"] = first_error(lambda: nan_step("ecx", compressor="topk"))
report(out)
"""


def test_resume_nan_and_refused_combination_on_every_rank(mpi_job):
    """Error memory / ECX deltas survive state_dict(): a run resumed at step 10 ends
    bit-identical to the uninterrupted one (Random-k's indices and noise are functions of
    seed, step and bucket). A NaN on rank 1 stops every rank with NonFiniteGradientError
    naming it (randomk's from its allreduce's status slots). ecx + topk is refused on every
    rank."""
    results = mpi_job(ROBUST, np=2, timeout=300).ok()
    for res in results:
        for method in ("topk", "threshold", "randomk", "ecx"):
            assert res[method]["resumed"] == res[method]["uninterrupted"], method
        for method in ("topk", "threshold", "randomk"):
            assert res[f"nan-{method}"].startswith("NonFiniteGradientError"), res
            assert "rank(s) [1]" in res[f"nan-{method}"], res
        assert res["ecx-topk"].startswith("ValueError") and "is refused" in res["ecx-topk"]
    assert results[0]["topk"]["resumed"] == results[1]["topk"]["resumed"]


SADDLE = """
import torch, horovod.torch as hvd, hvd_signsgd
hvd.init()
out = {}
runs = {}
for method in ("topk", "randomk"):
    for noise in (0.0, 0.01):
        z = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
        opt = hvd_signsgd.DistributedOptimizer(
            torch.optim.SGD([z], lr=0.1), named_parameters=[("z", z)], method=method, k=1,
            noise=noise, min_compress_numel=1, seed=5)
        runs[(method, noise)] = (z, opt)
for step in range(600):
    for z, opt in runs.values():      # every backward first: the exchanges run together
        opt.zero_grad()
        (0.5 * z[0] ** 2 + 0.25 * z[1] ** 4 - 0.5 * z[1] ** 2).backward()
    for z, opt in runs.values():
        opt.step()
for (method, noise), (z, opt) in runs.items():
    x, y = z.detach().tolist()
    out[f"{method}-{noise}"] = {"x": x, "y": y, "f": 0.5 * x * x + 0.25 * y ** 4 - 0.5 * y * y,
                                "bits": z.detach().numpy().tobytes().hex()}
report(out)
"""


def test_saddle_escape_two_ranks(mpi_job):
    """Section 6 / experiment 8: f = x^2/2 + y^4/4 - y^2/2 from (1, 0), lr 0.1, EF with Top-1
    or Random-1 (d = 2), each rank adding its own noise, 600 steps (the spec's 3000 run in
    simulation; the escape is over by step 300): without noise the run ends at the saddle
    (0, 0); with r = 0.01 both ranks end at the same minimum (0, +-1), f = -1/4."""
    results = mpi_job(SADDLE, np=2, timeout=300).ok()
    for key in results[0]:
        assert results[0][key]["bits"] == results[1][key]["bits"], key
        r = results[0][key]
        if key.endswith("-0.0"):
            assert abs(r["x"]) < 1e-6 and r["y"] == 0.0 and abs(r["f"]) < 1e-9, (key, r)
        else:
            assert abs(abs(r["y"]) - 1) < 0.01 and r["f"] < -0.2499, (key, r)


ECX = """
import math, torch, horovod.torch as hvd, hvd_signsgd
hvd.init()
rank = hvd.rank()
d, alpha, steps = 100, 0.05, 1500
h = torch.linspace(0.1, 10, d)
runs = {}
for gamma in (0.02, 0.005):
    for variant in ("exact", "ecx", "single", "none"):
        x = torch.nn.Parameter(torch.ones(d))
        opts = ({"method": "none"} if variant == "exact" else
                {"method": "ecx", "alpha": alpha, "compensation": variant})
        opt = hvd_signsgd.DistributedOptimizer(
            torch.optim.SGD([x], lr=gamma, momentum=1 - alpha, dampening=1 - alpha),
            named_parameters=[("x", x)], min_compress_numel=1, **opts)
        opt.state[x]["momentum_buffer"] = torch.zeros(d)   # v_0 = 0, as the spec's recursion
        runs[(gamma, variant)] = {"x": x, "opt": opt, "tail": [], "diverged": False}
gen = torch.Generator().manual_seed(100 + rank)
for k in range(steps):
    noise = torch.randn(d, generator=gen)       # the same draws for every variant: paired
    live = [r for r in runs.values() if not r["diverged"]]
    for r in live:
        r["opt"].zero_grad()
        (0.5 * (h * r["x"] * r["x"]).sum() + (noise * r["x"]).sum()).backward()
    for r in live:
        r["opt"].step()
        f = 0.5 * float((h * r["x"].detach() ** 2).sum())
        if not f < 1e8:                        # identical on every rank: x is
            r["diverged"] = True
        elif k >= steps - 500:
            r["tail"].append(f)
report({f"{g}-{v}": (math.inf if r["diverged"] else sum(r["tail"]) / len(r["tail"]))
        for (g, v), r in runs.items()})
"""


def test_ecx_ordering_on_the_noisy_quadratic_four_ranks(mpi_job):
    """Section 7(b) / experiment 9 with 4 real ranks (wrapped SGD(momentum=0.95,
    dampening=0.95) as the moving average, scaled sign), 1500 steps instead of 3000 to keep
    CI short (the simulation test runs 3000): mean f over the last 500 steps.
    ALGORITHMS.md (final f, 3000 steps): gamma 0.02: exact 0.120, ECX 0.123, single-step EC
    ~1e20, none 0.134; gamma 0.005: exact = ECX = single 0.032, none 0.046. Asserted: ECX
    within 3% of exact at both step sizes; single-step EC blows up at 0.02 (> 1000x exact)
    and is within 5% of exact at 0.005; no compensation is at least 5% worse than ECX at
    0.005. At 0.02 the ECX / none gap is within the noise (simulation seeds disagree on its
    sign), so it is reported, not asserted. Measured: gamma 0.02: exact 0.1305, ECX 0.1320,
    single 1.6e6, none 0.1257; gamma 0.005: exact 0.0544, ECX 0.0545, single 0.0550,
    none 0.0853 (higher than the 3000-step values: the slow modes are still decaying)."""
    results = mpi_job(ECX, np=4, timeout=500).ok()
    assert all(r == results[0] for r in results)
    f = results[0]
    print("ECX table (mean f, last 500 steps):", json.dumps(f))
    assert abs(f["0.02-ecx"] / f["0.02-exact"] - 1) < 0.03, f
    assert f["0.02-single"] > 1000 * f["0.02-exact"], f
    assert abs(f["0.005-ecx"] / f["0.005-exact"] - 1) < 0.03, f
    assert f["0.005-single"] < 1.05 * f["0.005-exact"], f
    assert f["0.005-none"] > 1.05 * f["0.005-ecx"], f


# --- hard threshold vs Top-k at equal transmitted elements (experiment 7) ------------------------

LOGREG = """
import torch
N, D, N_RANKS, BATCH, LR, STEPS, REG = 4000, 1000, 4, 32, 0.5, 1000, 1e-3
gen = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=gen) * (torch.rand(D, generator=gen) * 2)
w_true = torch.randn(D, generator=gen) * (torch.rand(D, generator=gen) < 0.1)
Y = ((X @ w_true + 0.5 * torch.randn(N, generator=gen)) > 0).float()

def loss(w, x=X, y=Y):
    return (torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y)
            + 0.5 * REG * (w * w).sum())

def minibatch(rank, step):
    xs, ys = X[rank::N_RANKS], Y[rank::N_RANKS]
    idx = torch.randint(len(ys), (BATCH,), generator=torch.Generator().manual_seed(
        1000 * step + rank))
    return xs[idx], ys[idx]
"""

# lam per Top-k ratio so that the total elements sent over the run match (calibrate())
LAMBDAS = {0.005: 0.748, 0.01: 0.3752, 0.05: 0.1077}

THRESHOLD_VS_TOPK = LOGREG + """
import horovod.torch as hvd, hvd_signsgd
hvd.init()
rank = hvd.rank()
runs = {}
for ratio, lam in LAMBDAS.items():
    for name, opts in ((f"topk-{ratio}", {"method": "topk", "ratio": ratio}),
                       (f"threshold-{ratio}", {"method": "threshold", "lam": lam,
                                               "max_density": 1.0})):
        w = torch.nn.Parameter(torch.zeros(D))
        opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD([w], lr=LR),
                                               named_parameters=[("w", w)], **opts)
        runs[name] = {"w": w, "opt": opt, "lam": lam if name.startswith("thr") else None,
                      "curve": [], "max_error": 0.0}
for step in range(STEPS):
    xb, yb = minibatch(rank, step)
    for r in runs.values():
        r["opt"].zero_grad()
        loss(r["w"], xb, yb).backward()
    for r in runs.values():
        r["opt"].step()
        e = r["opt"]._buckets[0].state["error"]
        r["max_error"] = max(r["max_error"], float(e.abs().max()))
        if step % 50 == 49:
            s = r["opt"].compression_stats()
            with torch.no_grad():
                r["curve"].append({"step": step + 1, "loss": float(loss(r["w"])),
                                   "nnz": s["total_nnz_sent"], "bytes": s["total_bytes_sent"],
                                   "error_norm": float(e.norm())})
report({name: {"curve": r["curve"], "max_error": r["max_error"], "lam": r["lam"]}
        for name, r in runs.items()})
""".replace("LAMBDAS.items()", repr(LAMBDAS) + ".items()")


def calibrate(ratios=(0.005, 0.01, 0.05)):
    """Find lam for each Top-k ratio so that the threshold run sends as many elements in
    total (bisection on log lam, in simulation: the same code as the MPI run). Not a test:
    `python tests/multirank/test_sparse_optimizer.py` prints the table for LAMBDAS."""
    import torch

    from hvd_signsgd.simulate import Simulation
    ns = {}
    exec(LOGREG, ns)

    def total(method, **options):
        sim = Simulation(method, n_ranks=ns["N_RANKS"], sizes=[ns["D"]], **options)
        w, sent = torch.zeros(ns["D"], requires_grad=True), 0
        for step in range(ns["STEPS"]):
            grads = []
            for r in range(ns["N_RANKS"]):
                w.grad = None
                ns["loss"](w, *ns["minibatch"](r, step)).backward()
                grads.append(w.grad.clone())
            with torch.no_grad():
                w -= ns["LR"] * sim.step(grads)
            sent += sum((m.numel() - 16) // 8 for m in sim.last_messages)
        return sent

    out = {}
    for ratio in ratios:
        target = total("topk", ratio=ratio)
        lo, hi = 1e-4, 10.0
        for _ in range(30):
            lam = math.sqrt(lo * hi)
            got = total("threshold", lam=lam, max_density=1.0)
            if abs(got - target) < 0.005 * target:
                break
            lo, hi = (lam, hi) if got > target else (lo, lam)
        out[ratio] = round(lam, 4)
    return out


def test_threshold_vs_topk_at_equal_total_elements(mpi_job, tmp_path):
    """Experiment 7, 4 ranks, logistic regression (N = 4000, D = 1000, mini-batch 32 per rank,
    lr 0.5, 1000 steps, EF): Top-k at 0.5%, 1%, 5% against the hard threshold with lam set so
    that the total transmitted elements match. Sahu et al. claim the threshold run reaches a
    lower loss at equal total bits. On this problem it does not (measured suboptimality
    f - f*, f* = 0.0597, at the end: 0.5%: Top-k 0.022 vs threshold 0.072; 1%: 0.013 vs 0.026;
    5%: 0.0125 vs 0.0126; Top-k is also ahead along the loss-vs-bits curves): the threshold
    spends its budget early, when gradients are large, and sends little late, while its
    error norm stays flat (bounded by sqrt(d) lam) and Top-k's keeps falling. So the
    comparison is recorded (runs/threshold_vs_topk.json: loss, elements and error norm every
    50 steps) and reported in the README rather than asserted. Asserted: the totals match
    within 2%, max |e_i| < lam on every rank after every step, both runs converge, and every
    rank ends bit-identical."""
    results = mpi_job(THRESHOLD_VS_TOPK, np=4, timeout=500).ok()
    for name in results[0]:        # bit-identical parameters: identical full-data losses
        assert len({json.dumps([c["loss"] for c in r[name]["curve"]]) for r in results}) == 1
    table = {}
    for ratio in LAMBDAS:
        topk, thr = results[0][f"topk-{ratio}"], results[0][f"threshold-{ratio}"]
        nnz_topk = sum(r[f"topk-{ratio}"]["curve"][-1]["nnz"] for r in results)
        nnz_thr = sum(r[f"threshold-{ratio}"]["curve"][-1]["nnz"] for r in results)
        assert abs(nnz_thr - nnz_topk) < 0.02 * nnz_topk, (ratio, nnz_topk, nnz_thr)
        for r in results:
            assert r[f"threshold-{ratio}"]["max_error"] < LAMBDAS[ratio]
        start = math.log(2)
        assert topk["curve"][-1]["loss"] < 0.5 * start and thr["curve"][-1]["loss"] < 0.5 * start
        table[ratio] = {"lam": LAMBDAS[ratio], "elements_topk": nnz_topk,
                        "elements_threshold": nnz_thr,
                        "final_loss_topk": topk["curve"][-1]["loss"],
                        "final_loss_threshold": thr["curve"][-1]["loss"],
                        "curve_topk": topk["curve"], "curve_threshold": thr["curve"]}
    out = ROOT / "runs"
    out.mkdir(exist_ok=True)
    (out / "threshold_vs_topk.json").write_text(json.dumps(table, indent=1))
    print("threshold vs topk (final full-data loss at equal total elements):",
          {r: (t["final_loss_topk"], t["final_loss_threshold"]) for r, t in table.items()})


# --- digits, 4 ranks (experiment 2 setting) ------------------------------------------------------

DIGITS = {
    "none": [],
    "topk": ["--lr", "0.1", "--momentum", "0.9", "--opt", "ratio=0.01"],
    # lam tuned to about the same average density as Top-k 1% (261 vs 263 pairs per step)
    "threshold": ["--lr", "0.1", "--momentum", "0.9", "--opt", "lam=0.07"],
}


def test_digits_sparse_accuracy_close_to_sgd(mpi_job, tmp_path):
    """Digits MLP, 4 ranks, 30 epochs: topk at 1% and threshold at a similar average density
    reach test accuracy within 2 points of `none` (measured: none 0.978, topk 0.972,
    threshold 0.972), at about 1/48 of the bytes."""
    runs = {}
    for method, extra in DIGITS.items():
        out = tmp_path / f"{method}.json"
        job = mpi_job(script=ROOT / "examples" / "train_digits.py", np=4, timeout=400,
                      args=["--method", method, "--epochs", "30", "--no-progress",
                            "--out", str(out), *extra])
        assert job.returncode == 0, job.diagnostics()
        runs[method] = json.loads(out.read_text())
    base = runs["none"]
    for method in ("topk", "threshold"):
        r = runs[method]
        assert r["ranks_identical"] and r["ranks"] == 4
        assert r["test_acc"] >= base["test_acc"] - 0.02, (method, r["test_acc"],
                                                          base["test_acc"])
        assert r["bytes_sent_per_rank"] * 25 <= base["bytes_sent_per_rank"], method
    ratio = runs["threshold"]["bytes_sent_per_rank"] / runs["topk"]["bytes_sent_per_rank"]
    assert 0.7 < ratio < 1.3, ratio      # similar density


if __name__ == "__main__":
    print("LAMBDAS =", calibrate())
