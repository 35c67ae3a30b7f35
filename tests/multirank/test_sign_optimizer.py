"""hvd_signsgd.DistributedOptimizer under real mpirun / horovodrun --gloo jobs (issue 4)."""
import json

import pytest
from harness import ROOT

SIGN_METHODS = ["none", "fp16", "signsgd", "signum", "stochastic_sign", "ssdm", "ef_signsgd"]


def round4(n):
    return (n + 3) // 4 * 4


def expected_bytes(method):
    """Bytes one rank sends per step for rankcommon.small_model, from the codec formulas.

    Buckets: the two weights (47x5 = 235 then 33x47 = 1551, reverse registration order; the
    second starts at 240, the next multiple of 8) and, dense, the two biases (5 then 47 at 8).
    Header 16 bytes, 4 per float32 scale, body padded to a multiple of 4.
    """
    n_weights, n_biases = 240 + 1551, 8 + 47
    dense = 4 * n_biases
    bits = round4((n_weights + 7) // 8)
    return {
        "none": 4 * n_weights + dense,
        "fp16": 2 * n_weights + dense,
        "signsgd": 16 + bits + dense,
        "signum": 16 + bits + dense,
        "stochastic_sign": 16 + 4 + bits + dense,   # + the sender's norm
        "ssdm": 16 + 4 + bits + dense,
        "ef_signsgd": 16 + 4 * 2 + bits + dense,     # one scale per weight tensor
    }[method]


BIT_IDENTICAL = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import SGD_SETTINGS, small_model, train, digest
hvd.init()
out = {}
for method in %r:
    model = small_model()
    before = digest(model)
    opt = torch.optim.SGD(model.parameters(), **SGD_SETTINGS[method])
    opt = hvd_signsgd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                           method=method, min_compress_numel=100)
    train(model, opt, 50, rank=hvd.rank())
    s = opt.compression_stats()
    out[method] = {"digest": digest(model), "changed": digest(model) != before,
                   "bytes_sent": s["bytes_sent"], "total": s["total_bytes_sent"],
                   "fp32": s["dense_fp32_bytes"], "steps": s["steps"],
                   "received": s["bytes_received"]}
report(out)
""".replace("%r", repr(SIGN_METHODS))


@pytest.mark.parametrize("np", [2, 3, 4])
def test_every_rank_bit_identical_after_50_steps(mpi_job, launcher, np):
    results = mpi_job(BIT_IDENTICAL, np=np, launcher=launcher, timeout=300).ok()
    for method in SIGN_METHODS:
        per_rank = [r[method] for r in results]
        assert len({r["digest"] for r in per_rank}) == 1, f"{method}: ranks differ"
        assert per_rank[0]["changed"], f"{method}: parameters never moved"
        for r in per_rank:
            assert r["steps"] == 50
            assert r["bytes_sent"] == expected_bytes(method), method
            assert r["total"] == 50 * expected_bytes(method), method
            assert r["fp32"] == 4 * (1551 + 235 + 47 + 5)


def test_received_bytes_are_the_other_ranks_payloads(mpi_job):
    results = mpi_job(BIT_IDENTICAL, np=3, timeout=300).ok()
    dense = 4 * (8 + 47)
    for method in ("signsgd", "ef_signsgd"):
        compressed = expected_bytes(method) - dense
        assert results[0][method]["received"] == 2 * compressed + dense


DIGITS = ["none", "signum", "ef_signsgd", "ssdm"]
# One seed's final accuracy swings by a few points, and differently from one CPU to another
# (the float results of the same code differ): Signum at lr 0.0025, seed 0 reached 0.972
# against SGD's 0.978 on one machine and 0.947 against the same 0.978 on another, and over
# seeds 0 / 1 / 2 it was 0.947 / 0.964 / 0.981 there against 0.978 / 0.956 / 0.989. So the
# test compares the mean over DIGITS_SEEDS. lr 0.003 (the example's default) gave 0.939 /
# 0.975 / 0.983 on the first machine; 0.0025 is used.
DIGITS_LR = {"signum": ["--lr", "0.0025"]}
DIGITS_SEEDS = (0, 1, 2)


def test_digits_accuracy_close_to_sgd_at_a_fraction_of_the_bytes(mpi_job, tmp_path):
    runs, acc = {}, {}
    for method in DIGITS:
        for seed in DIGITS_SEEDS:
            out = tmp_path / f"{method}-{seed}.json"
            job = mpi_job(script=ROOT / "examples" / "train_digits.py", np=4, timeout=400,
                          args=["--method", method, "--epochs", "30", "--no-progress",
                                "--seed", str(seed), "--out", str(out),
                                *DIGITS_LR.get(method, [])])
            assert job.returncode == 0, job.diagnostics()
            runs[method] = r = json.loads(out.read_text())
            assert r["ranks_identical"] and r["ranks"] == 4, (method, seed)
            acc.setdefault(method, []).append(r["test_acc"])
    mean = {m: sum(a) / len(a) for m, a in acc.items()}
    base = runs["none"]
    # 1 bit per coordinate is 32x less than fp32, but this MLP's input pixels that are 0 in
    # every sample of a rank's shard (4 to 6 of 64) leave 500-800 exact zeros in the momentum
    # or error memory of the first layer, which are marked (wire.FLAG_ZEROS, 32 bits each):
    # about 16x here.
    ratios = {m: base["bytes_sent_per_rank"] / runs[m]["bytes_sent_per_rank"]
              for m in ("signum", "ef_signsgd", "ssdm")}
    for method in ("signum", "ef_signsgd", "ssdm"):
        assert mean[method] >= mean["none"] - 0.02, acc
        assert ratios[method] >= 12, ratios


BUCKET_VIEWS = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import SGD_SETTINGS, small_model, batch, digest
hvd.init()
out = {}
for method in ("none", "signsgd", "ef_signsgd", "ssdm", "topk"):
    runs = {}
    for set_to_none in (True, False):
        model = small_model()
        model[2].double()          # a float64 layer: its gradient cannot be a view
        opt = torch.optim.SGD(model.parameters(), **SGD_SETTINGS[method])
        opt = hvd_signsgd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                               method=method, min_compress_numel=100)
        for k in range(20):
            x, y = batch(k, hvd.rank())
            opt.zero_grad(set_to_none=set_to_none)
            logits = model[2](model[1](model[0](x)).double()).float()
            loss = torch.nn.functional.cross_entropy(logits, y)
            loss.backward()
            opt.step()
        w32, w64 = model[0].weight, model[2].weight
        runs["none" if set_to_none else "zeroed"] = {
            "digest": digest(model),
            # the float32 weight's gradient lives in a bucket (a larger storage), the
            # float64 one is the gradient autograd made
            "view": w32.grad.untyped_storage().nbytes() > w32.grad.numel() * 4,
            "own64": w64.grad.dtype == torch.float64
                     and w64.grad.untyped_storage().nbytes() == w64.grad.numel() * 8,
        }
    out[method] = runs
report(out)
"""


def test_gradients_as_bucket_views_change_nothing_but_the_copies(mpi_job):
    """After a step, float32 gradients are views of the bucket, so backward accumulates into
    it; zero_grad(set_to_none=True) (new gradients, copied in) and set_to_none=False (the
    views, zeroed) must train bit-identically, on every rank, also with a float64 layer."""
    results = mpi_job(BUCKET_VIEWS, np=2, timeout=300).ok()
    for method in results[0]:
        digests = {r[method][s]["digest"] for r in results for s in ("none", "zeroed")}
        assert len(digests) == 1, f"{method}: runs or ranks differ"
        for r in results:
            for s in ("none", "zeroed"):
                assert r[method][s]["view"], (method, s)
                assert r[method][s]["own64"], (method, s)
