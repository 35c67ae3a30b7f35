"""Horovod's own DistributedOptimizer behaviours, checked for hvd_signsgd's wrapper (issue 11).

Horovod's test suite (test/parallel/test_torch.py) checks what a user script relies on beyond
the gradient values: the broadcast helpers and checkpoints in Horovod's documented order,
optimizer options taken from rank 0, frozen and unused parameters, two optimizers trained in
turns, clipping between synchronize() and step(), the warning when skip_synchronize() is
missing, zero_grad() racing the exchange, backward_passes_per_step, parameter names, sparse
embeddings, process sets and hvd.join(). Each test here asks the same of
hvd_signsgd.DistributedOptimizer with method="signsgd" and "ef_signsgd", and with "none" where
that shows Horovod's own semantics through our code path, written as a Horovod script and run
under real MPI (the common checks also under horovodrun --gloo).

Several checks run in one job (a job start costs seconds). Each rank reports after every
check, so a check that hangs or crashes shows up as the first missing entry, and the job's
timeout turns a hang into a failure.
"""
from __future__ import annotations

import shutil

import pytest
from harness import run_job

METHODS = ["none", "signsgd", "ef_signsgd"]
COMPRESSED = ["signsgd", "ef_signsgd"]


# Shared by every job (after the harness prelude, which defines report()).
COMMON = """
import faulthandler, hashlib, os, warnings
import torch, torch.nn as nn, torch.nn.functional as F
import horovod.torch as hvd
import hvd_signsgd
from rankcommon import digest

LR = {"none": 0.05, "signsgd": 0.01, "signum": 0.01, "ef_signsgd": 0.05}
# Shortly before the harness kills a hung job, every rank prints where it is.
faulthandler.dump_traceback_later(float(os.environ["PARITY_DUMP_AFTER"]), exit=False)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def deep_equal(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and \\
            torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and \\
            all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and \\
            all(deep_equal(x, y) for x, y in zip(a, b))
    return a == b


def tensor_digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to_dense().contiguous().numpy().tobytes())
    return h.hexdigest()


def steps(opt):
    return opt.compression_stats()["steps"]


def batch(step, n=8, d=20, classes=4):
    g = torch.Generator().manual_seed(1000 * step + hvd.rank())
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def mlp(seed=0):
    # the 20x12 and 12x4 weights are compressed (16 elements or more), the biases go dense
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 4))


def wrap(opt, model, method, **kw):
    named = model.named_parameters() if model is not None else None
    return hvd_signsgd.DistributedOptimizer(opt, named_parameters=named, method=method,
                                           min_compress_numel=16, **kw)


def sgd(model, method, **kw):
    return torch.optim.SGD(model.parameters(), lr=LR[method], **kw)


def train_step(model, opt, step):
    x, y = batch(step)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def run_checks(checks, methods):
    # The same order on every rank; report after each, so that a hang names its check.
    out = {}
    for method in methods:
        for fn in checks:
            try:
                res = fn(method)
            except Exception as e:  # noqa: BLE001 - the test shows what was raised
                res = {"raised": f"{type(e).__name__}: {e}"}
            out[f"{fn.__name__}/{method}"] = res
            report(out)
    # Leave together: a rank that exits shuts Horovod down under the others' last collectives.
    hvd.allgather_object(len(out))
    faulthandler.cancel_dump_traceback_later()
    return out
"""


def start(code, np=2, launcher="mpirun", timeout=180):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun not found: run `make setup` (installs Open MPI)")
    return run_job(COMMON + code, np=np, launcher=launcher, timeout=timeout,
                   env={"PARITY_DUMP_AFTER": str(max(timeout - 15, 5))})


def entry(job, key, ranks=None):
    """Every rank's result of one check. Fails, with the job's diagnostics, if a rank has
    none (it hung or crashed there) or the check raised."""
    ranks = range(job.np) if ranks is None else ranks
    got = [(job.results[r] or {}).get(key) for r in ranks]
    missing = [r for r, g in zip(ranks, got) if g is None]
    if missing:
        why = "timed out (hang?)" if job.timed_out else f"exited with {job.returncode}"
        pytest.fail(f"{key}: no result from ranks {missing}; the job {why}\n"
                    + job.diagnostics(), pytrace=False)
    raised = {r: g["raised"] for r, g in zip(ranks, got) if "raised" in g}
    assert not raised, f"{key} raised: {raised}"
    return got


def all_equal(values):
    return len(set(map(str, values))) == 1


# --- the common checks, under mpirun and horovodrun --gloo ------------------------------------

COMMON_CHECKS = """
hvd.init()
R = hvd.rank()


def broadcast_after_wrap(method):
    # Horovod's documented order: wrap, then broadcast parameters and optimizer state. A fresh
    # optimizer's state is initialised by a step with zero gradients: it must change nothing.
    model = mlp(seed=R)                 # the ranks start from different weights
    opt = wrap(sgd(model, method, momentum=0.9 if method == "none" else 0.0), model, method)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    before, ours = params(model), opt.state_dict().get("hvd_signsgd")
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    res = {"params_unchanged": same(before, params(model)),
           "method_state_unchanged": deep_equal(ours, opt.state_dict().get("hvd_signsgd")),
           "steps_after_broadcast": steps(opt)}
    for k in range(3):
        train_step(model, opt, k)
    res.update(steps_after_training=steps(opt), digest=digest(model))
    return res


def options_from_rank_0(method):
    # broadcast_optimizer_state also hands every rank rank 0's hyperparameters. (The weights
    # do not stay equal here, under Horovod either: its zero-gradient step at the broadcast
    # applies each rank's own weight decay.)
    mine = [dict(lr=0.1, momentum=0.8, weight_decay=0.2, nesterov=True),
            dict(lr=0.2, momentum=0.9, weight_decay=0.1, nesterov=False)][R]
    model = mlp()
    opt = wrap(torch.optim.SGD(model.parameters(), **mine), model, method)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    got = {k: opt.param_groups[0][k] for k in mine}
    train_step(model, opt, 0)           # the options still work with torch's SGD
    return {"options": got, "types": {k: type(v).__name__ for k, v in got.items()},
            "digest": digest(model)}


class Frozen(nn.Module):
    # an integer index that never trains, and a float table (128 elements: compressed)
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.index = nn.Parameter(torch.tensor([1, 3, 5, 7], dtype=torch.int32),
                                  requires_grad=False)
        self.table = nn.Parameter(torch.rand(8, 16))

    def forward(self, x):
        return (torch.index_select(self.table, 0, self.index.long()) * x).sum()


def frozen_parameter(method):
    model = Frozen()
    opt = wrap(sgd(model, method, momentum=0.9, nesterov=True, weight_decay=1e-6), model,
               method)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    for k in range(2):
        opt.zero_grad()
        model(batch(k, n=4, d=16)[0]).backward()
        opt.step()
    return {"frozen_grad_is_none": model.index.grad is None,
            "frozen_unchanged": model.index.tolist() == [1, 3, 5, 7],
            "grad": tensor_digest([model.table.grad]), "digest": digest(model)}


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 12), nn.Linear(12, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc2(F.relu(self.fc1(x)))
        return h, self.fc3(F.relu(h))


def unused_parameters(method):
    # rank 0 never uses fc3, rank 1 does: every gradient is still exchanged, every step
    model = TwoHeads()
    opt = wrap(sgd(model, method), model, method)
    for k in range(3):
        x, y = batch(k)
        opt.zero_grad()
        F.cross_entropy(model(x)[R % 2], y).backward()
        opt.step()
    return {"steps": steps(opt), "digest": digest(model)}


def turns_of_two_optimizers(method):
    # a generator and a discriminator, each with its own optimizer, trained in turns by
    # switching requires_grad
    torch.manual_seed(0)
    gen, disc = nn.Linear(8, 16), nn.Linear(16, 1)
    gen_opt = wrap(sgd(gen, method), gen, method)
    disc_opt = wrap(sgd(disc, method), disc, method)
    problems = []
    for k in range(6):
        train_gen = k % 2 == 0
        for p in gen.parameters():
            p.requires_grad_(train_gen)
        for p in disc.parameters():
            p.requires_grad_(not train_gen)
        gen_opt.zero_grad()
        disc_opt.zero_grad()
        disc(gen(batch(k, d=8)[0])).sum().backward()
        for name, mod, trained in (("gen", gen, train_gen), ("disc", disc, not train_gen)):
            for p in mod.parameters():
                has = p.grad is not None and bool(p.grad.abs().max() > 0)
                if has != trained:
                    problems.append(f"step {k}: {name} has a gradient: {has}")
        (gen_opt if train_gen else disc_opt).step()
    return {"problems": problems, "steps": [steps(gen_opt), steps(disc_opt)],
            "digest": digest(gen) + digest(disc)}


def sgd_reference(model, grads, lr):
    # what torch's SGD makes of these gradients, on copies of the parameters
    ps = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    torch.optim.SGD(ps, lr=lr).step()
    return [p.detach() for p in ps]


def clip_and_step(method, skip):
    model = mlp()
    opt = wrap(sgd(model, method), model, method)
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.synchronize()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
    clipped = [p.grad.clone() for p in model.parameters()]
    expected = sgd_reference(model, clipped, LR[method])
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        if skip:
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
    return {"norm_before": norm,
            "norm_after": float(torch.linalg.vector_norm(torch.cat([g.flatten()
                                                                    for g in clipped]))),
            "update_is_sgd_on_clipped": same(expected, params(model)),
            "warnings": [str(w.message) for w in ws], "steps": steps(opt),
            "digest": digest(model)}


def clip_inside_skip_synchronize(method):
    return clip_and_step(method, skip=True)


def step_without_skip_synchronize(method):
    return clip_and_step(method, skip=False)


def groups_without_names(method):
    model = mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters()},
                           {"params": model[2].parameters(), "lr": LR[method] / 2}],
                          lr=LR[method])
    opt = hvd_signsgd.DistributedOptimizer(opt, method=method, min_compress_numel=16)
    for k in range(3):
        train_step(model, opt, k)
    return {"steps": steps(opt), "digest": digest(model)}


def zero_grad_between_backward_and_step(method):
    model = mlp()
    opt = wrap(sgd(model, method), model, method)
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    try:
        opt.zero_grad()
        err = None
    except AssertionError as e:
        err = str(e)
    opt.step()                          # the exchange started in backward completes
    train_step(model, opt, 1)
    return {"zero_grad_error": err, "steps": steps(opt), "digest": digest(model)}


def two_backward_passes_per_step(method):
    model = mlp()
    opt = wrap(sgd(model, method), model, method, backward_passes_per_step=2)
    for k in range(2):
        opt.zero_grad()
        for half in range(2):
            x, y = batch(2 * k + half)
            F.cross_entropy(model(x), y).backward()
        opt.step()
    res = {"steps": steps(opt), "digest": digest(model), "third_pass_error": None}
    opt.zero_grad()
    try:                                # one pass too many before step()
        for half in range(3):
            x, y = batch(10 + half)
            F.cross_entropy(model(x), y).backward()
    except Exception as e:  # noqa: BLE001
        res["third_pass_error"] = f"{type(e).__name__}: {e}"
    return res


run_checks([broadcast_after_wrap, options_from_rank_0, frozen_parameter, unused_parameters,
            turns_of_two_optimizers, clip_inside_skip_synchronize,
            step_without_skip_synchronize, groups_without_names,
            zero_grad_between_backward_and_step, two_backward_passes_per_step],
           ["none", "signsgd", "ef_signsgd"])
"""


@pytest.fixture(scope="module", params=["mpirun", "gloo"])
def common_job(request):
    return start(COMMON_CHECKS, launcher=request.param, timeout=240)


@pytest.mark.parametrize("method", METHODS)
def test_broadcast_after_wrap_changes_nothing(common_job, method):
    res = entry(common_job, f"broadcast_after_wrap/{method}")
    for r in res:
        assert r["params_unchanged"], r
        assert r["method_state_unchanged"], r
        assert r["steps_after_broadcast"] == 0, r
        assert r["steps_after_training"] == 3, r
    assert all_equal(r["digest"] for r in res)


@pytest.mark.parametrize("method", METHODS)
def test_broadcast_optimizer_state_gives_rank_0s_options(common_job, method):
    res = entry(common_job, f"options_from_rank_0/{method}")
    for r in res:
        assert r["options"] == dict(lr=0.1, momentum=0.8, weight_decay=0.2, nesterov=True), r
        assert r["types"] == dict(lr="float", momentum="float", weight_decay="float",
                                  nesterov="bool"), r


@pytest.mark.parametrize("method", METHODS)
def test_frozen_integer_parameter_is_left_alone(common_job, method):
    res = entry(common_job, f"frozen_parameter/{method}")
    for r in res:
        assert r["frozen_grad_is_none"] and r["frozen_unchanged"], r
    assert all_equal(r["grad"] for r in res) and all_equal(r["digest"] for r in res)


@pytest.mark.parametrize("method", METHODS)
def test_parameter_unused_on_one_rank(common_job, method):
    res = entry(common_job, f"unused_parameters/{method}")
    assert [r["steps"] for r in res] == [3, 3]
    assert all_equal(r["digest"] for r in res)


@pytest.mark.parametrize("method", METHODS)
def test_two_optimizers_trained_in_turns(common_job, method):
    res = entry(common_job, f"turns_of_two_optimizers/{method}")
    for r in res:
        assert r["problems"] == [] and r["steps"] == [3, 3], r
    assert all_equal(r["digest"] for r in res)


@pytest.mark.parametrize("method", METHODS)
def test_clipping_between_synchronize_and_step(common_job, method):
    res = entry(common_job, f"clip_inside_skip_synchronize/{method}")
    for r in res:
        assert r["norm_before"] > 0.05 and r["norm_after"] <= 0.05 * (1 + 1e-5), r
        assert r["update_is_sgd_on_clipped"], r
        assert r["warnings"] == [] and r["steps"] == 1, r
    assert all_equal(r["digest"] for r in res)


@pytest.mark.parametrize("method", METHODS)
def test_step_after_synchronize_warns_and_changes_nothing(common_job, method):
    res = entry(common_job, f"step_without_skip_synchronize/{method}")
    for r in res:
        assert len(r["warnings"]) == 1, r
        assert "optimizer.step() called without optimizer.skip_synchronize()" in \
            r["warnings"][0], r
        assert r["update_is_sgd_on_clipped"] and r["steps"] == 1, r
    assert all_equal(r["digest"] for r in res)


@pytest.mark.parametrize("method", METHODS)
def test_param_groups_without_named_parameters(common_job, method):
    res = entry(common_job, f"groups_without_names/{method}")
    assert [r["steps"] for r in res] == [3, 3]
    assert all_equal(r["digest"] for r in res)


@pytest.mark.parametrize("method", METHODS)
def test_zero_grad_between_backward_and_step_is_refused(common_job, method):
    res = entry(common_job, f"zero_grad_between_backward_and_step/{method}")
    for r in res:
        assert r["zero_grad_error"] and r["zero_grad_error"].startswith(
            "optimizer.zero_grad() was called after loss.backward() but before "
            "optimizer.step() or optimizer.synchronize()"), r
        assert r["steps"] == 2, r
    assert all_equal(r["digest"] for r in res)


@pytest.mark.parametrize("method", METHODS)
def test_backward_passes_per_step(common_job, method):
    res = entry(common_job, f"two_backward_passes_per_step/{method}")
    for r in res:
        assert r["steps"] == 2, r
        assert "more than backward_passes_per_step times" in (r["third_pass_error"] or ""), r
    assert all_equal(r["digest"] for r in res)


# --- bad arguments: the same ValueError on every rank ---------------------------------------

ERRORS = """
from rankcommon import first_error
hvd.init()


def duplicate_names(method):
    a, b = nn.Linear(20, 12), nn.Linear(20, 12)
    opt = torch.optim.SGD(list(a.parameters()) + list(b.parameters()), lr=0.1)
    named = list(a.named_parameters()) + list(b.named_parameters())   # weight, bias twice
    return {"error": first_error(lambda: hvd_signsgd.DistributedOptimizer(
        opt, named_parameters=named, method=method))}


def missing_names(method):
    model = mlp()
    opt = sgd(model, method)
    named = list(model.named_parameters())[:1]
    return {"error": first_error(lambda: hvd_signsgd.DistributedOptimizer(
        opt, named_parameters=named, method=method))}


def seed_per_rank(method):
    # the random streams must be the same on every rank: a per-rank seed is a mistake
    model = mlp()
    return {"error": first_error(lambda: wrap(sgd(model, method), model, method,
                                              seed=hvd.rank()))}


run_checks([duplicate_names, missing_names, seed_per_rank], ["signsgd", "ef_signsgd"])
"""


@pytest.fixture(scope="module")
def errors_job():
    return start(ERRORS, timeout=120)


@pytest.mark.parametrize("method", COMPRESSED)
@pytest.mark.parametrize("check", ["duplicate_names", "missing_names"])
def test_bad_named_parameters_raise_on_every_rank(errors_job, check, method):
    res = entry(errors_job, f"{check}/{method}")
    assert all((r["error"] or "").startswith("ValueError") for r in res), res
    assert all_equal(r["error"] for r in res)


@pytest.mark.parametrize("method", COMPRESSED)
def test_seed_per_rank_raises_on_every_rank(errors_job, method):
    res = entry(errors_job, f"seed_per_rank/{method}")
    assert all((r["error"] or "").startswith("ValueError") and "seed" in r["error"]
               for r in res), res
    assert all_equal(r["error"] for r in res)


# --- checkpoints as Horovod writes them: rank 0 saves, rank 0 loads and broadcasts ------------

CHECKPOINTS = """
hvd.init()
R = hvd.rank()


def build(method):
    model = mlp()
    opt = wrap(sgd(model, method, momentum=0.9 if method == "none" else 0.0), model, method)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    return model, opt


def rank0_checkpoint(method):
    path = os.path.join(os.environ["HVD_TEST_OUT"], f"ckpt-{method}.pt")
    model, opt = build(method)
    for k in range(3):
        train_step(model, opt, k)
    if R == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    for k in range(3, 6):
        train_step(model, opt, k)
    res = {"uninterrupted": digest(model), "uninterrupted_steps": steps(opt)}
    model, opt = build(method)
    if R == 0:                          # only rank 0 reads the file, as in Horovod's examples
        ckpt = torch.load(path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    res["steps_at_resume"] = steps(opt)
    for k in range(3, 6):
        train_step(model, opt, k)
    res.update(resumed=digest(model), resumed_steps=steps(opt))
    return res


def plain_checkpoint_into_compressed(method):
    # a checkpoint of a plain hvd.DistributedOptimizer run resumes a run of ours
    path = os.path.join(os.environ["HVD_TEST_OUT"], f"plain-{method}.pt")
    model = mlp()
    opt = hvd.DistributedOptimizer(sgd(model, "none", momentum=0.9),
                                   named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    for k in range(3):
        train_step(model, opt, k)
    if R == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    saved = digest(model)
    saved_momentum = tensor_digest([opt.state[p]["momentum_buffer"] for p in model.parameters()])

    model = mlp(seed=1)
    opt = wrap(sgd(model, method, momentum=0.9), model, method)
    if R == 0:
        ckpt = torch.load(path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    res = {"params_restored": digest(model) == saved,
           "momentum_restored": tensor_digest([opt.state[p]["momentum_buffer"]
                                               for p in model.parameters()]) == saved_momentum}
    for k in range(3, 5):
        train_step(model, opt, k)
    res["digest"] = digest(model)
    return res


run_checks([rank0_checkpoint, plain_checkpoint_into_compressed], ["none", "signsgd", "ef_signsgd"])
"""


@pytest.fixture(scope="module")
def checkpoint_job():
    return start(CHECKPOINTS, timeout=60)


@pytest.mark.parametrize("method", METHODS)
def test_rank_0_loads_the_checkpoint_and_broadcasts_it(checkpoint_job, method):
    res = entry(checkpoint_job, f"rank0_checkpoint/{method}")
    # rank 0 loaded step 3; the others take it over at the next step's control exchange
    assert res[0]["steps_at_resume"] == 3
    for r in res:
        assert r["resumed_steps"] == r["uninterrupted_steps"], r
    assert all_equal(r["resumed"] for r in res)
    if method != "ef_signsgd":
        # no per-rank state (the error memory of ef_signsgd is: rank 1's is not in the file)
        assert [r["resumed"] for r in res] == [r["uninterrupted"] for r in res]


@pytest.mark.parametrize("method", METHODS)
def test_plain_horovod_checkpoint_resumes_our_run(checkpoint_job, method):
    res = entry(checkpoint_job, f"plain_checkpoint_into_compressed/{method}")
    for r in res:
        assert r["params_restored"] and r["momentum_restored"], r
    assert all_equal(r["digest"] for r in res)


# --- process sets: 2 of 3 ranks exchange, the third trains alone -----------------------------

PROCESS_SET = """
pair = hvd.ProcessSet([0, 1])
hvd.init(process_sets=[pair])
R = hvd.rank()


def outside_rank_trains_locally(method):
    model = mlp()
    opt = wrap(sgd(model, method), model, method, process_set=pair)
    res = {"grads_kept": []}
    for k in range(3):
        x, y = batch(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        local = [p.grad.clone() for p in model.parameters()]
        opt.synchronize()
        res["grads_kept"].append(same(local, [p.grad for p in model.parameters()]))
        with opt.skip_synchronize():
            opt.step()
    res.update(digest=digest(model), steps=steps(opt))
    return res


run_checks([outside_rank_trains_locally], ["none", "signsgd", "ef_signsgd"])
"""


@pytest.fixture(scope="module")
def process_set_job():
    return start(PROCESS_SET, np=3, timeout=120)


@pytest.mark.parametrize("method", METHODS)
def test_process_set_of_two_out_of_three(process_set_job, method):
    res = entry(process_set_job, f"outside_rank_trains_locally/{method}")
    assert res[0]["digest"] == res[1]["digest"] != res[2]["digest"], res
    assert res[0]["steps"] == res[1]["steps"] == 3, res
    assert res[0]["grads_kept"] == res[1]["grads_kept"] == [False] * 3, res
    assert res[2]["grads_kept"] == [True] * 3, res      # its synchronize() is a no-op


# --- one process runs the same method ----------------------------------------------------------

ONE_PROCESS = """
hvd.init()


def single_process(method):
    model = mlp()
    opt = wrap(sgd(model, method), model, method)
    for k in range(3):
        train_step(model, opt, k)
    ours = opt.state_dict().get("hvd_signsgd") or {}
    state = [v for b in ours.get("buckets", []) for v in b.values()
             if torch.is_tensor(v) and v.is_floating_point()]
    return {"steps": steps(opt), "method_state_nonzero": any(bool(v.any()) for v in state),
            "grad_values": sorted(set(model[0].weight.grad.flatten().tolist()))}


run_checks([single_process], ["signsgd", "signum", "ef_signsgd"])
"""


@pytest.fixture(scope="module")
def one_process_job():
    return start(ONE_PROCESS, np=1, timeout=120)


@pytest.mark.parametrize("method", ["signsgd", "signum", "ef_signsgd"])
def test_one_process_runs_the_method(one_process_job, method):
    (r,) = entry(one_process_job, f"single_process/{method}")
    assert r["steps"] == 3, r
    if method == "signsgd":             # the vote of one rank is the sign of its gradient
        assert set(r["grad_values"]) <= {-1.0, 0.0, 1.0}, r
    else:                               # momentum / error memory
        assert r["method_state_nonzero"], r


# --- sparse embeddings --------------------------------------------------------------------------

SPARSE = """
hvd.init()
R = hvd.rank()


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 8, sparse=True)      # 800 elements: compressed
        self.out = nn.Linear(8, 4)

    def forward(self, idx):
        return self.out(self.emb(idx).mean(1))


def lookups(k):
    g = torch.Generator().manual_seed(10 * k + R)
    # the ranks look up different rows, and different numbers of them
    return torch.randint(0, 100, (6, 3 + R), generator=g), torch.randint(0, 4, (6,), generator=g)


def embedding_with_sgd(method, sparse_as_dense):
    model = Bag()
    opt = wrap(sgd(model, method), model, method, sparse_as_dense=sparse_as_dense)
    for k in range(3):
        idx, y = lookups(k)
        opt.zero_grad()
        F.cross_entropy(model(idx), y).backward()
        opt.step()
    return {"steps": steps(opt), "digest": digest(model)}


def embedding_with_sparse_adam(method, sparse_as_dense):
    torch.manual_seed(0)
    emb = nn.Embedding(100, 8, sparse=True)
    opt = wrap(torch.optim.SparseAdam(list(emb.parameters()), lr=0.01), emb, method,
               sparse_as_dense=sparse_as_dense)
    for k in range(3):
        opt.zero_grad()
        emb(lookups(k)[0]).sum().backward()
        opt.step()
    return {"steps": steps(opt), "digest": digest(emb)}


def sgd_sparse(method):
    return embedding_with_sgd(method, False)


def sgd_sparse_as_dense(method):
    return embedding_with_sgd(method, True)


def adam_sparse(method):
    return embedding_with_sparse_adam(method, False)


def adam_sparse_as_dense(method):
    return embedding_with_sparse_adam(method, True)


run_checks([sgd_sparse_as_dense, adam_sparse_as_dense, sgd_sparse, adam_sparse],
           ["none", "signsgd", "ef_signsgd"])
"""


@pytest.fixture(scope="module")
def sparse_job():
    return start(SPARSE, timeout=180)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("check", ["sgd_sparse_as_dense", "adam_sparse_as_dense"])
def test_sparse_embedding_sent_as_dense(sparse_job, check, method):
    res = entry(sparse_job, f"{check}/{method}")
    assert [r["steps"] for r in res] == [3, 3]
    assert all_equal(r["digest"] for r in res)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("check", ["sgd_sparse", "adam_sparse"])
def test_sparse_embedding_without_sparse_as_dense(sparse_job, check, method):
    res = entry(sparse_job, f"{check}/{method}")
    assert [r["steps"] for r in res] == [3, 3]
    assert all_equal(r["digest"] for r in res)


# --- hvd.join() with uneven batches -------------------------------------------------------------

JOIN = """
hvd.init()
R = hvd.rank()


def uneven_batches(method):
    # rank 0 has three batches, rank 1 two; each joins when it runs out
    model = mlp()
    opt = wrap(sgd(model, method), model, method)
    errors = []
    for k in range(3 if R == 0 else 2):
        try:
            train_step(model, opt, k)
        except Exception as e:  # noqa: BLE001
            errors.append(f"step {k}: {type(e).__name__}: {e}")
            break
    try:
        joined = hvd.join()
    except Exception as e:  # noqa: BLE001
        errors.append(f"join: {type(e).__name__}: {e}")
        joined = None
    return {"errors": errors, "joined": joined, "all_joined": hvd.allgather_object(joined)}


run_checks([uneven_batches], ["none", "signsgd", "ef_signsgd"])
"""


@pytest.fixture(scope="module")
def join_job():
    return start(JOIN, timeout=60)


@pytest.mark.parametrize("method", METHODS)
def test_join_with_uneven_batches(join_job, method):
    """Either a clear error (naming join) or a clean finish; never a hang or a crash."""
    res = entry(join_job, f"uneven_batches/{method}")
    errors = [e for r in res for e in r["errors"]]
    assert all("join" in e.lower() for e in errors), errors
    if not errors:
        assert all_equal(r["joined"] for r in res) and res[0]["joined"] is not None, res
    for r in res:
        assert r["all_joined"] == [res[0]["joined"]] * 2, res
