"""Checkpoints, gradient accumulation and bad input, under real MPI (issue 4)."""
import pytest

RESUME = """
import horovod.torch as hvd
from rankcommon import resume_roundtrip
hvd.init()
out = {}
for method in ("signum", "ssdm", "ef_signsgd", "stochastic_sign"):
    uninterrupted, resumed, opt = resume_roundtrip(method, 20, hvd.rank())
    out[method] = {"uninterrupted": uninterrupted, "resumed": resumed,
                   "steps": opt.compression_stats()["steps"]}
report(out)
"""


def test_resume_from_step_20_matches_uninterrupted_run(mpi_job):
    results = mpi_job(RESUME, np=2, timeout=300).ok()
    for res in results:
        for method, r in res.items():
            assert r["resumed"] == r["uninterrupted"], method
            assert r["steps"] == 40
    assert results[0]["signum"]["resumed"] == results[1]["signum"]["resumed"]


SAVE = """
import torch, horovod.torch as hvd, hvd_signsgd, os
from rankcommon import SGD_SETTINGS, small_model, train
hvd.init()
model = small_model()
opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                       named_parameters=model.named_parameters(),
                                       method="ef_signsgd", min_compress_numel=100)
train(model, opt, 3, rank=hvd.rank())
torch.save(opt.state_dict(), os.path.join(os.environ["CKPT_DIR"], f"opt-{hvd.rank()}.pt"))
report({})
"""

LOAD = """
import torch, horovod.torch as hvd, hvd_signsgd, os
from rankcommon import small_model, first_error, train
hvd.init()
model = small_model()
opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                       named_parameters=model.named_parameters(),
                                       method="ef_signsgd", min_compress_numel=100)
# WHICH=rank0: every rank loads rank 0's file; WHICH=modulo2: rank r loads file r % 2
rank_file = 0 if os.environ["WHICH"] == "rank0" else hvd.rank() % 2
sd = torch.load(os.path.join(os.environ["CKPT_DIR"], f"opt-{rank_file}.pt"))
# loading is local, as in Horovod; the ranks compare notes at the next step
report({"load": first_error(lambda: opt.load_state_dict(sd)),
        "error": first_error(lambda: train(model, opt, 1, rank=hvd.rank()))})
"""


def test_resume_with_other_world_size_fails_clearly_on_every_rank(mpi_job, tmp_path):
    env = {"CKPT_DIR": str(tmp_path), "WHICH": "modulo2"}
    mpi_job(SAVE, np=2, timeout=120, env=env).ok()
    # 3 ranks resume from the files of a 2-rank job (rank 2 takes rank 0's file)
    results = mpi_job(LOAD, np=3, timeout=120, env=env).ok()
    for r in results:
        assert r["load"] is None
        assert "written by a job of 2 ranks and this job has 3" in r["error"]


def test_loading_another_ranks_state_fails_on_every_rank(mpi_job, tmp_path):
    env = {"CKPT_DIR": str(tmp_path), "WHICH": "rank0"}
    mpi_job(SAVE, np=2, timeout=120, env=env).ok()
    results = mpi_job(LOAD, np=2, timeout=120, env=env).ok()
    for r in results:
        assert r["load"] is None
        assert "rank 1: this rank loaded the state saved by rank 0" in r["error"]


ACCUMULATE = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import digest
hvd.init()
out = {}
# signsgd / signum keep the weights on the lr grid, so every gradient stays exact in float32
# and the two ways of accumulating must agree bit for bit
for method in ("signsgd", "signum"):
    digests = []
    for passes in (1, 2):
        torch.manual_seed(0)
        model = torch.nn.Linear(40, 30, bias=False)
        with torch.no_grad():   # small integers: every gradient below is exact in float32
            model.weight.copy_(torch.randint(-4, 5, (30, 40)).float())
        opt = hvd_signsgd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.125),
            named_parameters=model.named_parameters(), method=method,
            backward_passes_per_step=passes, min_compress_numel=100)
        for k in range(10):
            g = torch.Generator().manual_seed(100 * k + hvd.rank())
            x = torch.randint(-3, 4, (8, 40), generator=g).float()
            y = torch.randint(-3, 4, (8, 30), generator=g).float()
            opt.zero_grad()
            if passes == 1:
                ((model(x) - y) ** 2).sum().backward()
            else:
                ((model(x[:4]) - y[:4]) ** 2).sum().backward()
                ((model(x[4:]) - y[4:]) ** 2).sum().backward()
            opt.step()
        digests.append(digest(model))
    out[method] = digests
report(out)
"""


def test_backward_passes_per_step_equals_one_pass_over_the_doubled_batch(mpi_job):
    for res in mpi_job(ACCUMULATE, np=2, timeout=180).ok():
        for method, (one, two) in res.items():
            assert one == two, method


BAD_INPUT = """
import math, torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, first_error, batch
hvd.init()
r = hvd.rank()
def wrap(model, **kw):
    kw.setdefault("named_parameters", model.named_parameters())
    kw.setdefault("min_compress_numel", 100)
    return hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), **kw)

def one_step(model, opt, poison=False):
    x, y = batch(0, r)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    if poison:
        loss = loss * float("nan")
    loss.backward()
    opt.step()

out = {}
out["other_model"] = first_error(lambda: wrap(small_model(hidden=47 if r == 0 else 48),
                                              method="signum"))
out["unknown_method_one_rank"] = first_error(
    lambda: wrap(small_model(), method="signum" if r == 0 else "sgnum"))
out["unknown_method"] = first_error(lambda: wrap(small_model(), method="majority"))
m = small_model()
out["duplicate_names"] = first_error(
    lambda: wrap(m, named_parameters=[("w", p) for p in m.parameters()], method="signum"))
m = small_model()
opt = wrap(m, method="signum")
out["nan_on_rank_1"] = first_error(lambda: one_step(m, opt, poison=(r == 1)))
m = small_model()
opt = wrap(m, method="ef_signsgd")
out["after_nan_still_works"] = first_error(lambda: one_step(m, opt))

class WithEmbedding(torch.nn.Module):
    def __init__(self, sparse):
        super().__init__()
        self.emb = torch.nn.Embedding(300, 8, sparse=sparse)
    def forward(self, idx):
        return self.emb(idx).sum()
def sparse_step(sparse_as_dense):
    m = WithEmbedding(sparse=True)
    opt = wrap(m, method="signsgd", sparse_as_dense=sparse_as_dense)
    opt.zero_grad()
    m(torch.tensor([1, 2, 3])).backward()
    opt.step()
out["sparse"] = first_error(lambda: sparse_step(False))
out["sparse_as_dense"] = first_error(lambda: sparse_step(True))
c = torch.nn.Linear(4, 4).to(torch.complex64)
out["complex"] = first_error(lambda: wrap(c, method="signsgd"))
report(out)
"""


@pytest.mark.parametrize("np", [2, 3])
def test_bad_input_gives_one_clear_error_on_every_rank(mpi_job, launcher, np):
    results = mpi_job(BAD_INPUT, np=np, launcher=launcher, timeout=240).ok()
    for r in results:
        assert "ValueError" in r["other_model"] and "do not agree" in r["other_model"]
        assert "unknown method 'sgnum'" in r["unknown_method_one_rank"]
        assert "unknown method 'majority'" in r["unknown_method"]
        assert "duplicates: ['w']" in r["duplicate_names"]
        assert r["nan_on_rank_1"].startswith("NonFiniteGradientError")
        assert "rank(s) [1]" in r["nan_on_rank_1"]
        assert r["after_nan_still_works"] is None
        assert r["sparse"] is None            # sparse gradients travel sparse (issue 11)
        assert r["sparse_as_dense"] is None
        assert "complex64" in r["complex"]


STOCK_HOROVOD = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, first_error, batch, digest
hvd.init()
out = {}
for name in ("signsgd", "signum", "ef_signsgd", "fp16"):
    model = small_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(),
                                   compression=getattr(hvd_signsgd.Compression, name))
    def run():
        for k in range(5):
            x, y = batch(k, hvd.rank())
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    out[name] = {"error": first_error(run), "digest": digest(model)}
    # the same exchange through hvd_signsgd.DistributedOptimizer(compression=...)
    model = small_model()
    opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                           named_parameters=model.named_parameters(),
                                           compression=getattr(hvd_signsgd.Compression, name))
    out[name]["ours"] = first_error(run)
    out[name]["ours_method"] = opt.method.name
report(out)
"""


def test_compressors_in_stock_horovod_work_or_refuse_clearly(mpi_job):
    results = mpi_job(STOCK_HOROVOD, np=3, timeout=240).ok()
    for r in results:
        assert r["signsgd"]["error"] is None and r["fp16"]["error"] is None
        for name in ("signum", "ef_signsgd"):
            assert r[name]["error"].startswith("TypeError")
            assert "hvd_signsgd.DistributedOptimizer" in r[name]["error"]
        for name in ("signsgd", "signum", "ef_signsgd", "fp16"):
            assert r[name]["ours"] is None and r[name]["ours_method"] == name
    assert len({r["signsgd"]["digest"] for r in results}) == 1


HOROVOD_API = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, first_error, batch, digest
hvd.init()
r = hvd.rank()
out = {}
# gradient clipping the Horovod way: synchronize, clip, then step without a second exchange
model = small_model()
opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(),
                                       method="ef_signsgd", min_compress_numel=100)
norms = []
for k in range(5):
    x, y = batch(k, r)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.synchronize()
    norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)))
    with opt.skip_synchronize():
        opt.step()
out["clip_digest"] = digest(model)
out["steps"] = opt.compression_stats()["steps"]
out["clip_norm"] = float(sum(p.grad.norm() ** 2 for p in model.parameters()) ** 0.5)
# zero_grad between backward and step would race with the exchange
x, y = batch(9, r)
torch.nn.functional.cross_entropy(model(x), y).backward()
out["zero_grad_race"] = first_error(opt.zero_grad)
opt.step()
# warm-up: the first start_step steps go uncompressed, then the method takes over
model = small_model()
opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.002),
                                       named_parameters=model.named_parameters(),
                                       method="signum", min_compress_numel=100, start_step=3)
sent = []
for k in range(6):
    x, y = batch(k, r)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sent.append(opt.compression_stats()["bytes_sent"])
out["warmup_sent"] = sent
report(out)
"""


def test_synchronize_skip_synchronize_zero_grad_and_warmup(mpi_job):
    results = mpi_job(HOROVOD_API, np=2, timeout=180).ok()
    assert results[0]["clip_digest"] == results[1]["clip_digest"]
    for r in results:
        assert r["steps"] == 5                       # one exchange per step, not two
        assert r["clip_norm"] <= 0.01 + 1e-6         # step() did not overwrite clipped grads
        assert r["zero_grad_race"].startswith("AssertionError")
        dense, compressed = r["warmup_sent"][0], r["warmup_sent"][-1]
        assert r["warmup_sent"] == [dense] * 3 + [compressed] * 3
        assert dense == 4 * (240 + 1551 + 8 + 47) and compressed * 10 < dense


NAN_RECOVERY = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, first_error, batch, digest
hvd.init()
r = hvd.rank()
out = {}
for method, kw in (("signsgd", {}), ("ef_signsgd", {}),
                   ("stochastic_sign", {"num_groups": 2}), ("ssdm", {"num_groups": 2})):
    m = small_model()
    opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01),
                                           named_parameters=m.named_parameters(),
                                           method=method, min_compress_numel=100, **kw)
    def one_step(k, poison=False):
        x, y = batch(k, r)
        opt.zero_grad()
        # NaN in one layer's gradient only (one bucket of two with num_groups=2)
        h = m[2].weight.register_hook(lambda g: g * float("nan")) if poison else None
        try:
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        finally:
            if h is not None:
                h.remove()
    before = digest(m)
    errors = [first_error(lambda: one_step(0, poison=(r == 1)))]
    unchanged = digest(m) == before
    errors += [first_error(lambda: one_step(k)) for k in (1, 2)]
    out[method] = {"errors": errors, "unchanged": unchanged, "digest": digest(m),
                   "moved": digest(m) != before,
                   "buckets": opt.compression_stats()["compressed_buckets"]}
report(out)
"""


def test_nan_in_one_bucket_fails_the_step_everywhere_and_training_goes_on(mpi_job):
    """Rank 1's gradient is NaN in one bucket only. Every rank raises the same error for
    that step and applies nothing; the same optimizer then keeps training, identically on
    every rank. With a whole-model norm (stochastic_sign, ssdm over two buckets) the NaN
    bucket leaves no finite norm for the other bucket either: it must not fail on rank 1
    alone (that would leave rank 0 waiting)."""
    results = mpi_job(NAN_RECOVERY, np=2, timeout=240).ok()
    for method in results[0]:
        for r in results:
            first, *rest = r[method]["errors"]
            assert first and first.startswith("NonFiniteGradientError"), (method, first)
            assert "rank(s) [1]" in first, (method, first)
            assert rest == [None, None], (method, rest)
            assert r[method]["unchanged"] and r[method]["moved"], method
        assert len({r[method]["digest"] for r in results}) == 1, method
    assert results[0]["stochastic_sign"]["buckets"] == 2
