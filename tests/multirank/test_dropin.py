"""Issue 11: a Horovod script runs unchanged apart from the optimizer line.

Each job is written the way Horovod's documentation writes a training script (hvd.init, build,
wrap, broadcast parameters and optimizer state, train), and each test asserts the exact property
that matters: parameters bit-identical, state unchanged, the same error on every rank.
"""
import pytest

CANONICAL_ORDER = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import SGD_SETTINGS, small_model, train, digest
hvd.init()
out = {}
for method in ("signsgd", "signum", "ssdm", "ef_signsgd", "topk", "none"):
    model = small_model(seed=hvd.rank())            # different on purpose: the broadcast fixes it
    settings = dict(SGD_SETTINGS[method], weight_decay=0.01)
    opt = torch.optim.SGD(model.parameters(), **settings)
    opt = hvd_signsgd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                           method=method, min_compress_numel=100)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    before = digest(model)
    state = [{k: v.clone() for k, v in b.state.items()} for b in opt._buckets]
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    same_state = all(torch.equal(v, s[k]) for b, s in zip(opt._buckets, state)
                     for k, v in b.state.items())
    r = {"unchanged": digest(model) == before, "state": same_state,
         "steps": opt.compression_stats()["steps"]}
    train(model, opt, 5, rank=hvd.rank())
    r.update(digest=digest(model), after=opt.compression_stats()["steps"])
    out[method] = r
report(out)
"""


@pytest.mark.parametrize("np", [2, 3])
def test_wrap_then_broadcast_changes_nothing(mpi_job, launcher, np):
    """Horovod's order: wrap, broadcast_parameters, broadcast_optimizer_state. The last calls
    step() on zero gradients to initialise state: parameters, method state and the step
    counter must stay as they were (weight decay included), and training then runs."""
    results = mpi_job(CANONICAL_ORDER, np=np, launcher=launcher, timeout=300).ok()
    for method in results[0]:
        for r in results:
            m = r[method]
            assert m["unchanged"] and m["state"], method
            assert m["steps"] == 0 and m["after"] == 5, method
        assert len({r[method]["digest"] for r in results}) == 1, method


RANK0_RESUME = """
import os, warnings, torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import SGD_SETTINGS, small_model, train, digest
hvd.init()
rank = hvd.rank()
path = os.path.join(os.environ["HVD_TEST_OUT"], "ckpt-{}.pt")
out = {}

def build(method, **kw):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), **SGD_SETTINGS[method])
    opt = hvd_signsgd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                           method=method, min_compress_numel=100, **kw)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    return model, opt

for method in ("stochastic_sign", "ef_signsgd", "topk"):
    model, opt = build(method, seed=5)
    train(model, opt, 6, rank=rank)
    if rank == 0:                                   # Horovod's idiom: rank 0 saves
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()},
                   path.format(method))
    hvd.allreduce(torch.zeros(1), name="barrier." + method)
    train(model, opt, 6, start=6, rank=rank)
    uninterrupted = digest(model)
    model, opt = build(method, seed=5)              # a new job resuming on rank 0
    if rank == 0:
        ckpt = torch.load(path.format(method))
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train(model, opt, 6, start=6, rank=rank)
    out[method] = {"uninterrupted": uninterrupted, "resumed": digest(model),
                   "steps": opt.compression_stats()["steps"],
                   "notice": [str(x.message) for x in w if "starts fresh" in str(x.message)]}

# a plain Horovod checkpoint (no hvd_signsgd section) loads into a compressed run
model = small_model()
plain = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                 named_parameters=model.named_parameters())
train(model, plain, 3, rank=rank)
sd = plain.state_dict()
model2, opt2 = build("ef_signsgd")
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    opt2.load_state_dict(sd)
train(model2, opt2, 3, rank=rank)
out["plain"] = {"digest": digest(model2),
                "notice": [str(x.message) for x in w if "starts fresh" in str(x.message)]}
report(out)
"""


def test_rank0_loads_then_broadcasts(mpi_job, launcher):
    """Rank 0 alone loads the checkpoint rank 0 alone saved, then Horovod's broadcasts: no hang;
    every rank continues from the loaded step counter, so a method without per-rank state
    (stochastic_sign: its random streams follow the step) continues bit-exactly. Methods with
    per-rank memory continue identically on every rank, the other ranks' memory fresh (a
    one-line notice says so)."""
    results = mpi_job(RANK0_RESUME, np=2, launcher=launcher, timeout=300).ok()
    for r in results:
        assert r["stochastic_sign"]["resumed"] == r["stochastic_sign"]["uninterrupted"]
        for method in ("stochastic_sign", "ef_signsgd", "topk"):
            assert r[method]["steps"] == 12, method
        assert r["plain"]["notice"] and "starts fresh" in r["plain"]["notice"][0]
    for method in ("ef_signsgd", "topk"):
        assert len({r[method]["resumed"] for r in results}) == 1, method
        assert not results[0][method]["notice"] and results[1][method]["notice"], method
    assert len({r["plain"]["digest"] for r in results}) == 1


STATELESS_OTHER_SIZE = """
import os, torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, train, digest
hvd.init()
model = small_model()
opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                       named_parameters=model.named_parameters(),
                                       method="signsgd", min_compress_numel=100)
f = os.path.join(os.environ["CKPT_DIR"], "opt-%d.pt" % (hvd.rank() % 2))
if os.environ["PHASE"] == "save":
    train(model, opt, 4, rank=hvd.rank())
    torch.save(opt.state_dict(), f)
else:
    opt.load_state_dict(torch.load(f))
    train(model, opt, 2, start=4, rank=hvd.rank())
report({"steps": opt.compression_stats()["steps"], "digest": digest(model)})
"""


def test_stateless_method_resumes_at_another_world_size(mpi_job, tmp_path):
    mpi_job(STATELESS_OTHER_SIZE, np=2, timeout=120,
            env={"CKPT_DIR": str(tmp_path), "PHASE": "save"}).ok()
    results = mpi_job(STATELESS_OTHER_SIZE, np=3, timeout=120,
                      env={"CKPT_DIR": str(tmp_path), "PHASE": "load"}).ok()
    assert [r["steps"] for r in results] == [6, 6, 6]
    assert len({r["digest"] for r in results}) == 1


PROCESS_SET = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, train, digest
hvd.init()
# Horovod 0.28's static hvd.init(process_sets=[...]) leaves the set unregistered on a random
# rank now and then (its own race); the dynamic registration is collective and reliable
ps = hvd.add_process_set([0, 2])
out = {}
for method in ("signsgd", "ef_signsgd", "none"):
    model = small_model()
    before = digest(model)
    opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                           named_parameters=model.named_parameters(),
                                           method=method, min_compress_numel=100,
                                           process_set=ps)
    if ps.included():
        train(model, opt, 4, rank=hvd.rank())
    else:
        opt.synchronize()                           # a no-op outside the set
    out[method] = {"included": ps.included(), "digest": digest(model),
                   "moved": digest(model) != before, "steps": opt.compression_stats()["steps"]}
hvd.allreduce(torch.zeros(1), name="end")   # Horovod shuts down once any rank has finished
report(out)
"""


def test_process_set_two_of_three(mpi_job, launcher):
    results = mpi_job(PROCESS_SET, np=3, launcher=launcher, timeout=240,
                      env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1"}).ok()
    for method in results[0]:
        inside = [results[0][method], results[2][method]]
        outside = results[1][method]
        assert all(r["included"] and r["moved"] and r["steps"] == 4 for r in inside), method
        assert inside[0]["digest"] == inside[1]["digest"], method
        assert not outside["included"] and not outside["moved"] and outside["steps"] == 0


ONE_PROCESS = """
import warnings, torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, batch
hvd.init()
out = {}
for method in ("signsgd", "signum", "ef_signsgd"):
    model = small_model()
    opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                           named_parameters=model.named_parameters(),
                                           method=method, min_compress_numel=100)
    w = model[0].weight
    x, y = batch(0, 0)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    g = w.grad.clone()
    before = w.detach().clone()
    opt.synchronize()
    once = w.grad.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.synchronize()                           # a second one changes nothing
        twice = w.grad.clone()
        opt.step()                                  # without skip_synchronize: no new exchange
    s = opt.compression_stats()
    out[method] = {
        "sign": torch.equal(once, torch.sign(g)) if method != "ef_signsgd" else None,
        "stable": torch.equal(once, twice), "applied": torch.equal(w, before - 0.5 * once),
        "warnings": len(caught), "steps": s["steps"], "sent": s["bytes_sent"]}
report(out)
"""


def test_one_process_runs_the_method(mpi_job):
    """With one rank the vote is the rank's own sign: the method runs as with n ranks
    (signum's update is the sign of its momentum, not the raw gradient)."""
    (r,) = mpi_job(ONE_PROCESS, np=1, timeout=120).ok()
    for method, m in r.items():
        assert m["sign"] in (True, None), method
        assert m["stable"] and m["applied"], method
        assert m["warnings"] == 2 and m["steps"] == 1 and m["sent"] > 0, method


SEED_AND_ECX = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, first_error
hvd.init()
def wrap(opt_kw, hidden=47, **kw):
    model = small_model(hidden=hidden)
    return hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), **opt_kw),
                                            named_parameters=model.named_parameters(),
                                            min_compress_numel=100, **kw)
out = {
    # a common line in training scripts, wrong here: the method derives per-rank streams
    "seed": first_error(lambda: wrap({"lr": 0.1}, method="randomk", seed=hvd.rank())),
    "ecx_plain_momentum": first_error(lambda: wrap({"lr": 0.1, "momentum": 0.9},
                                                   method="ecx", alpha=0.1)),
    "ecx_right": first_error(lambda: wrap({"lr": 0.1, "momentum": 0.9, "dampening": 0.9},
                                          method="ecx", alpha=0.1)),
}
# rank 0 builds one wrapper more (over another model) than the others: an error, not a hang
extra = first_error(lambda: wrap({"lr": 0.1}, hidden=9, method="signsgd")) \
    if hvd.rank() == 0 else None
out["extra_wrapper"] = extra or first_error(lambda: wrap({"lr": 0.1}, method="signsgd"))
report(out)
"""


def test_seed_ecx_and_an_extra_wrapper_fail_on_every_rank(mpi_job, launcher):
    results = mpi_job(SEED_AND_ECX, np=3, launcher=launcher, timeout=180).ok()
    for r in results:
        assert r["seed"].startswith("ValueError") and "seed" in r["seed"], r["seed"]
        assert r["ecx_plain_momentum"].startswith("ValueError")
        assert "dampening=0.9" in r["ecx_plain_momentum"]
        assert r["ecx_right"] is None
        assert r["extra_wrapper"].startswith("ValueError") and "do not agree" in \
            r["extra_wrapper"]


AMP_SKIP = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import SGD_SETTINGS, small_model, batch, digest
hvd.init()
rank = hvd.rank()
out = {}
for method in ("signsgd", "signum", "ssdm", "ef_signsgd", "topk", "randomk", "ecx"):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), **SGD_SETTINGS[method])
    opt = hvd_signsgd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                           method=method, min_compress_numel=100,
                                           on_nonfinite="skip")
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    log = []
    for k in range(6):
        x, y = batch(k, rank)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        if k == 3 and rank == 1:
            loss = loss * float("inf")              # an overflow on one rank only
        before = (digest(model), [{n: v.clone() for n, v in b.state.items()}
                                  for b in opt._buckets], opt.compression_stats()["steps"])
        scaler.scale(loss).backward()
        opt.synchronize()                           # Horovod's AMP pattern
        scaler.unscale_(opt)
        with opt.skip_synchronize():
            scaler.step(opt)
        scaler.update()
        state_same = all(torch.equal(v, s[n]) for b, s in zip(opt._buckets, before[1])
                         for n, v in b.state.items())
        log.append({"unchanged": digest(model) == before[0], "state_same": state_same,
                    "steps": opt.compression_stats()["steps"] - before[2],
                    "scale": scaler.get_scale()})
    out[method] = {"log": log, "digest": digest(model),
                   "skipped": opt.compression_stats()["total_skipped_steps"]}
report(out)
"""


def test_amp_overflow_step_is_skipped_on_every_rank(mpi_job, launcher):
    """torch.amp.GradScaler with Horovod's pattern (synchronize, unscale_, skip_synchronize +
    scaler.step): an overflow on one rank skips that step on every rank with parameters,
    method state and step counter unchanged; the scale drops and training continues."""
    results = mpi_job(AMP_SKIP, np=2, launcher=launcher, timeout=300).ok()
    for method in results[0]:
        for r in results:
            log = r[method]["log"]
            assert log[3]["unchanged"] and log[3]["state_same"] and log[3]["steps"] == 0, method
            assert log[3]["scale"] == log[2]["scale"] / 2, method
            assert all(not e["unchanged"] and e["steps"] == 1 for e in log[4:]), method
            assert r[method]["skipped"] == 1, method
        assert len({r[method]["digest"] for r in results}) == 1, method


NAN_RAISE_STATE = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import SGD_SETTINGS, small_model, batch, digest, first_error, train
hvd.init()
rank = hvd.rank()
out = {}
for method in ("signum", "ef_signsgd", "topk"):
    model = small_model()
    opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(),
                                                           **SGD_SETTINGS[method]),
                                           named_parameters=model.named_parameters(),
                                           method=method, min_compress_numel=100, num_groups=2)
    train(model, opt, 2, rank=rank)
    state = [{n: v.clone() for n, v in b.state.items()} for b in opt._buckets]
    def bad_step():
        x, y = batch(7, rank)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        # NaN in the last layer only on rank 1: the first bucket is finite everywhere
        h = model[2].weight.register_hook(lambda g: g * float("nan")) if rank == 1 else None
        loss.backward()
        if h is not None:
            h.remove()
        opt.step()
    err = first_error(bad_step)
    same = all(torch.equal(v, s[n]) for b, s in zip(opt._buckets, state)
               for n, v in b.state.items())
    train(model, opt, 2, start=3, rank=rank)
    out[method] = {"error": err, "state_same": same, "digest": digest(model),
                   "steps": opt.compression_stats()["steps"]}
report(out)
"""


def test_nan_raise_leaves_every_ranks_state_as_before(mpi_job):
    results = mpi_job(NAN_RAISE_STATE, np=3, timeout=240).ok()
    for method in results[0]:
        for r in results:
            assert r[method]["error"].startswith("NonFiniteGradientError"), method
            assert r[method]["state_same"], method
            assert r[method]["steps"] == 4, method
        assert len({r[method]["digest"] for r in results}) == 1, method


WARMUP = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, batch
hvd.init()
out = {}
for method in ("signsgd", "signum", "ssdm"):
    model = small_model()
    opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                           named_parameters=model.named_parameters(),
                                           method=method, min_compress_numel=100, start_step=2,
                                           **({"beta": "schedule"} if method == "ssdm" else {}))
    sizes = []
    for k in range(4):
        x, y = batch(k, hvd.rank())
        w = model[0].weight.detach().clone()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sizes.append(float((model[0].weight - w).abs().mean()))
    out[method] = {"sizes": sizes}
report(out)
"""


def test_warmup_update_has_the_scale_of_a_vote(mpi_job):
    """During warm-up the dense mean gradient is scaled per tensor to a mean |step| of lr,
    the size of a +-1 vote step, so the update's scale does not jump when compression starts."""
    results = mpi_job(WARMUP, np=2, timeout=180).ok()
    for method, r in results[0].items():
        warm, compressed = r["sizes"][:2], r["sizes"][2:]
        for s in warm:
            assert abs(s - 0.01) < 1e-6, (method, r["sizes"])
        for s in compressed:      # a vote moves every coordinate by lr (ties: 0; ssdm: means)
            assert 0.002 <= s <= 0.01 + 1e-6, (method, r["sizes"])


SPARSE = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import digest
hvd.init()
rank = hvd.rank()
out = {}
for method in ("none", "fp16", "signsgd", "ef_signsgd", "topk"):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(1000, 16, sparse=True)
    head = torch.nn.Linear(16, 3)
    params = list(emb.named_parameters(prefix="emb")) + list(head.named_parameters(prefix="h"))
    opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD([p for _, p in params], lr=0.1),
                                           named_parameters=params, method=method,
                                           min_compress_numel=30)
    start = emb.weight.detach().clone()
    touched = set()
    for k in range(4):
        rows = torch.tensor([10 * k + rank, 500 + k, 7])   # each rank its own rows, and shared
        touched |= {10 * k + r for r in range(hvd.size())} | {500 + k, 7}
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(emb(rows)), torch.tensor([0, 1, 2])).backward()
        opt.step()
    untouched = [i for i in range(1000) if i not in touched]
    out[method] = {
        "untouched_same": torch.equal(emb.weight[untouched], start[untouched]),
        "touched_moved": not torch.equal(emb.weight[sorted(touched)], start[sorted(touched)]),
        "digest": digest(torch.nn.ModuleList([emb, head])),
        "sparse_grad": emb.weight.grad.is_sparse}
report(out)
"""


def test_sparse_gradients_without_sparse_as_dense(mpi_job, launcher):
    """nn.Embedding(sparse=True) trains without sparse_as_dense under every method: sparse rows
    travel as (index, value) pairs as in Horovod, and rows no rank touched stay untouched."""
    results = mpi_job(SPARSE, np=3, launcher=launcher, timeout=240).ok()
    for method in results[0]:
        for r in results:
            assert r[method]["untouched_same"] and r[method]["touched_moved"], method
            assert r[method]["sparse_grad"], method
        assert len({r[method]["digest"] for r in results}) == 1, method


JOIN = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import SGD_SETTINGS, small_model, batch, digest
hvd.init()
rank = hvd.rank()
out = {}
for method in ("signsgd", "signum", "stochastic_sign", "ssdm", "ef_signsgd", "topk",
               "threshold", "randomk", "ecx", "fp16", "none"):
    model = small_model()
    opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(),
                                                           **SGD_SETTINGS[method]),
                                           named_parameters=model.named_parameters(),
                                           method=method, min_compress_numel=100)
    n_batches = 3 + 2 * rank                        # uneven shards: rank r has 3 + 2r batches
    for k in range(n_batches):
        x, y = batch(k, rank)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    joined_steps = opt.join()
    out[method] = {"digest": digest(model), "joined_steps": joined_steps,
                   "steps": opt.compression_stats()["steps"]}
report(out)
"""


def test_uneven_data_with_optimizer_join(mpi_job, launcher):
    """Ranks run out of batches at different steps and call optimizer.join(): the joined ranks
    vote nothing but take part in and apply every later step, so all ranks end identical."""
    results = mpi_job(JOIN, np=3, launcher=launcher, timeout=300).ok()
    for method in results[0]:
        assert len({r[method]["digest"] for r in results}) == 1, method
        assert [r[method]["joined_steps"] for r in results] == [4, 2, 0], method
        assert all(r[method]["steps"] == 7 for r in results), method


HVD_JOIN = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, batch, first_error
hvd.init()
rank = hvd.rank()
model = small_model()
opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                       named_parameters=model.named_parameters(),
                                       method="signsgd", min_compress_numel=100)
def steps(n):
    for k in range(n):
        x, y = batch(k, rank)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
err = first_error(lambda: steps(2 if rank == 0 else 4))
hvd.join()                                          # Horovod's own join
report({"error": err})
"""


def test_hvd_join_with_a_compressed_method_is_an_error_not_a_hang(mpi_job):
    results = mpi_job(HVD_JOIN, np=2, timeout=180).ok()
    assert results[0]["error"] is None
    assert results[1]["error"].startswith("StepError") and "optimizer.join()" in \
        results[1]["error"]


STOCK_NAN = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, batch, first_error
hvd.init()
model = small_model()
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                               named_parameters=model.named_parameters(),
                               compression=hvd_signsgd.Compression.signsgd)
def step(poison):
    x, y = batch(0, hvd.rank())
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    (loss * float("nan") if poison else loss).backward()
    opt.step()
report({"error": first_error(lambda: step(hvd.rank() == 1))})
"""


def test_stock_horovod_compressor_raises_on_every_rank_for_nan(mpi_job):
    """Through stock hvd.DistributedOptimizer, a NaN on one rank must not leave the others
    waiting: it travels as NaN and every rank raises."""
    for r in mpi_job(STOCK_NAN, np=3, timeout=120).ok():
        assert r["error"] and r["error"].startswith("FloatingPointError"), r


OVERLAP = """
import time, torch, horovod.torch as hvd, hvd_signsgd
hvd.init()
out = {}
for overlap in (True, False):
    torch.manual_seed(0)
    # each layer in 8 column blocks, so that backward is 8 nodes a layer: a tensor hook on
    # each block's weight stamps autograd's progress often
    layers = [[torch.nn.Linear(1024, 128) for _ in range(8)] for _ in range(4)]
    named = [(f"l{i}.{j}.{n}", p) for i, l in enumerate(layers) for j, b in enumerate(l)
             for n, p in b.named_parameters()]
    opt = hvd_signsgd.DistributedOptimizer(
        torch.optim.SGD([p for _, p in named], lr=0.01), named_parameters=named,
        method="topk", ratio=0.01, min_compress_numel=2000,   # a selection: a long encode
        groups=[[b.weight for b in l] for l in layers], overlap=overlap)
    events = []
    for l in layers:
        for b in l:
            b.weight.register_hook(lambda g: events.append(time.perf_counter()))
    inside = 0
    # off: 4 steps, none may overlap. on: until one does (a starved worker may miss a few)
    for k in range(24 if overlap else 4):
        if overlap and hvd.allreduce(torch.tensor(inside), op=hvd.Min, name=f"all{k}"):
            break       # once every rank has seen one; all ranks stop together
        events.clear()
        h = torch.randn(512, 1024, generator=torch.Generator().manual_seed(k + hvd.rank()))
        for l in layers:
            h = torch.tanh(torch.cat([b(h) for b in l], 1))
        opt.zero_grad()
        h.sum().backward()
        opt.step()
        spans = [(t0, t1) for _, t0, t1 in opt._engine.launch_times]
        inside += sum(1 for t in events for t0, t1 in spans if t0 < t < t1)
    out["on" if overlap else "off"] = inside
report(out)
"""


def test_encoding_overlaps_backward(mpi_job):
    """Timestamps, not wall time: with overlap on, autograd computes gradients (tensor hooks
    fire) while a bucket is being encoded on the launch worker; with it off, encoding runs
    inside the hook and nothing of backward happens during it."""
    for r in mpi_job(OVERLAP, np=2, timeout=240).ok():
        assert r["off"] == 0, r
        assert r["on"] > 0, r


LOAD_IN_FLIGHT = """
import copy, warnings, torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, train, digest, batch
hvd.init()
rank = hvd.rank()
out = {}
for method in ("ef_signsgd", "signum"):
    for who in ("every", "rank0"):
        model = small_model()
        opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                               named_parameters=model.named_parameters(),
                                               method=method, min_compress_numel=100)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        train(model, opt, 2, rank=rank)
        ckpt = copy.deepcopy(opt.state_dict())
        train(model, opt, 2, start=2, rank=rank)
        before = copy.deepcopy(opt.state_dict()["hvd_signsgd"]["buckets"])
        # backward() has launched the exchange; the state is loaded before step(), and
        # the script logs its loss (a collective of its own) in between
        x, y = batch(4, rank)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if who == "every" or rank == 0:
                opt.load_state_dict(ckpt)
            hvd.allreduce(loss.detach(), name=f"loss.{method}.{who}")
            opt.step()
        want = ckpt["hvd_signsgd"]["buckets"]
        got = opt.state_dict()["hvd_signsgd"]["buckets"]
        same = lambda a, b: all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
        out[f"{method}-{who}"] = {"kept": same(want, got), "moved": not same(before, got),
                                  "stateful": any(len(a) for a in want),
                                  "loaded": who == "every" or rank == 0,
                                  "step": opt.state_dict()["hvd_signsgd"]["step"],
                                  "warnings": [str(x.message) for x in w],
                                  "digest": digest(model)}
        train(model, opt, 1, start=5, rank=rank)      # and training goes on
report(out)
"""


def test_load_state_dict_between_backward_and_step_keeps_the_loaded_state(mpi_job, launcher):
    """A checkpoint loaded after backward() (its exchange in flight) is the state step()
    leaves: the in-flight step does not write its method state over it. Loading
    communicates nothing, so rank 0 may load alone while the others log their loss."""
    results = mpi_job(LOAD_IN_FLIGHT, np=2, launcher=launcher, timeout=300).ok()
    for r in results:
        for key, res in r.items():
            assert res["stateful"] and not res["warnings"], (key, res)
            if res["loaded"]:
                assert res["kept"] and res["step"] == 2, (key, res)
            else:
                assert res["moved"] and res["step"] == 5, (key, res)
    for key in results[0]:
        assert len({r[key]["digest"] for r in results}) == 1, key
