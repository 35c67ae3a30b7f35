"""A step that fails part way, after some buckets were launched and before the others: the
method state must be exactly as before the step (engine._restore restores only the buckets
launched in it; a bucket not launched keeps its state, whose backup is a step older).

The failure is a user's Method (signum) whose encode raises for one bucket at one step on
every rank. With overlap=False it raises inside backward, from the hook, so the buckets whose
gradients come later are never launched; with overlap=True it raises on the launch worker and
synchronize() reports it before launching the bucket of a layer that step did not use.
"""
import pytest

JOB = """
import torch, horovod.torch as hvd, hvd_signsgd
from hvd_signsgd.methods import Signum
from rankcommon import batch, digest, first_error
hvd.init()
rank = hvd.rank()
OVERLAP = {overlap}

class FailsOnce(Signum):
    fail = False

    def encode(self, g, state, ctx):
        if self.fail and ctx.bucket.endswith(".b1"):
            raise RuntimeError("encode failed")
        return super().encode(g, state, ctx)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(33, 29, bias=False)
        self.b = torch.nn.Linear(29, 5, bias=False)
        self.c = torch.nn.Linear(33, 5, bias=False)

    def forward(self, x, use_c):
        out = self.b(torch.tanh(self.a(x)))
        return out + self.c(x) if use_c else out

def make():
    m, method = Net(), FailsOnce(beta=0.5)
    # one bucket per weight (buckets c, b, a: reverse registration order)
    opt = hvd_signsgd.DistributedOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.01), named_parameters=m.named_parameters(),
        method=method, bucket_cap_mb=1e-6, min_compress_numel=100, overlap=OVERLAP)
    return m, opt, method

def step(m, opt, k):
    x, y = batch(k, rank)
    opt.zero_grad()
    # layer c takes part in steps 0 and 1 only
    torch.nn.functional.cross_entropy(m(x, use_c=k < 2), y).backward()
    opt.step()

def state(opt):
    return [v.clone() for b in opt.state_dict()["hvd_signsgd"]["buckets"] for v in b.values()]

m, opt, method = make()
step(m, opt, 0)
step(m, opt, 1)
before = state(opt)
method.fail = True
out = {{"error": first_error(lambda: step(m, opt, 2))}}
method.fail = False
after = state(opt)
out["restored"] = [bool(torch.equal(x, y)) for x, y in zip(before, after)]
step(m, opt, 3)
# a run that never had step 2
ref, ref_opt, _ = make()
for k in (0, 1, 3):
    step(ref, ref_opt, k)
out["same_as_without_step"] = digest(m) == digest(ref) and all(
    torch.equal(x, y) for x, y in zip(state(opt), state(ref_opt)))
out["digest"] = digest(m)
report(out)
"""


@pytest.mark.parametrize("overlap", [False, True])
def test_failed_step_restores_only_launched_buckets(mpi_job, overlap):
    results = mpi_job(JOB.format(overlap=overlap), np=2, launcher="mpirun", timeout=90).ok()
    for r in results:
        assert r["error"] and "encode failed" in r["error"], r["error"]
        assert len(r["restored"]) == 3 and all(r["restored"]), r["restored"]
        assert r["same_as_without_step"]
    assert len({r["digest"] for r in results}) == 1
