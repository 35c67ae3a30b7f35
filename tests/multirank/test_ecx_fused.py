"""ErrorCompensatedX's fused encode (kernels.ecx_sign, buffers rotated out of place) under real
mpirun / horovodrun --gloo jobs: a NaN on one rank is rolled back on every rank.

The rank with the NaN finds it in its kernel and leaves delta1/delta2 as they were; the other
ranks' kernels succeed and rotate their buffers, and must rotate them back when the step fails
(ErrorFeedback.rollback; the engine keeps no backup of them). The run with the poisoned step
must then end exactly where a run without it ends: same parameters on every rank and, on each
rank, the same delta1 and delta2, bit for bit."""
import pytest

JOB = """
import hashlib, torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import SGD_SETTINGS, small_model, batch, digest, first_error
hvd.init()
r = hvd.rank()
POISON_AT, STEPS = 3, 8

def memories(opt):
    h = {}
    for i, b in enumerate(opt.state_dict()["hvd_signsgd"]["buckets"]):
        for k, v in sorted(b.items()):
            h[f"{i}.{k}"] = hashlib.sha256(v.numpy().tobytes()).hexdigest()
    return h

def step(model, opt, k, poison=False):
    x, y = batch(k, r)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    (loss * float("nan") if poison else loss).backward()
    opt.step()

def run(compensation, policy, poison):
    model = small_model()
    opt = hvd_signsgd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), **SGD_SETTINGS["ecx"]),
        named_parameters=model.named_parameters(), method="ecx", compensation=compensation,
        min_compress_numel=100, on_nonfinite=policy)
    assert opt.method.fused
    rec = {}
    for k in range(STEPS):
        if poison and k == POISON_AT:
            before = (digest(model), memories(opt))
            rec["error"] = first_error(lambda: step(model, opt, k, poison=(r == 1)))
            rec["kept"] = (digest(model), memories(opt)) == before
        step(model, opt, k)
    rec["digest"], rec["memories"] = digest(model), memories(opt)
    rec["keys"] = sorted(rec["memories"])
    return rec

out = {}
for compensation in ("ecx", "single"):
    for policy in ("raise", "skip"):
        key = f"{compensation}-{policy}"
        out[key] = {"poisoned": run(compensation, policy, True),
                    "clean": run(compensation, policy, False)}
report(out)
"""


@pytest.mark.parametrize("np", [2, 3])
def test_nan_on_one_rank_rolls_back_both_memories_on_every_rank(mpi_job, np):
    results = mpi_job(JOB, np=np, timeout=300).ok()
    for key in ("ecx-raise", "ecx-skip", "single-raise", "single-skip"):
        runs = [res[key] for res in results]
        for rank, run in enumerate(runs):
            poisoned, clean = run["poisoned"], run["clean"]
            if key.endswith("raise"):
                assert poisoned["error"].startswith("NonFiniteGradientError"), (key, rank)
                assert "rank(s) [1]" in poisoned["error"], (key, rank)
            else:
                assert poisoned["error"] is None, (key, rank)
            assert poisoned["kept"], (key, rank)            # nothing changed by the bad step
            assert poisoned["digest"] == clean["digest"], (key, rank)
            assert poisoned["memories"] == clean["memories"], (key, rank)
            want = ["0.delta1", "0.delta2"] if key.startswith("ecx") else ["0.delta1"]
            assert [k for k in poisoned["keys"] if k.startswith("0.")] == want, key
        assert len({run["poisoned"]["digest"] for run in runs}) == 1, key   # every rank
        # the memories are per rank (different data): equal would mean they were not kept
        assert len({str(run["clean"]["memories"]) for run in runs}) == np, key
