"""Buckets whose launch waits for the other ranks (exchange="hierarchical": the host's
allreduce; threshold under exchange="auto": the size exchange) must leave in the same order on
every rank, or two ranks wait in different buckets for each other forever. The order in which
backward hands buckets over can differ between ranks: here two independent branches are
computed in the opposite order on some ranks, so autograd (which runs the later-created
branch first) finishes their gradients in the opposite order. The gradients are the same as
with one order everywhere, so the result must be too (bit-identical)."""
import pytest

JOB = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import batch, digest, first_error
hvd.init()
rank = hvd.rank()
METHOD, OPTS, EXCHANGE, FLIP = {method!r}, {opts!r}, {exchange!r}, {flip!r}

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.p = torch.nn.Linear(33, 5, bias=False)
        self.q = torch.nn.Linear(33, 5, bias=False)

    def forward(self, x, flip):
        if flip:
            v = self.q(x)
            u = self.p(x)
        else:
            u = self.p(x)
            v = self.q(x)
        return u + v

def run(flip, overlap, record):
    m = Net()
    # one bucket per weight: q is bucket 0, p bucket 1 (reverse registration order)
    opt = hvd_signsgd.DistributedOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.01), named_parameters=m.named_parameters(),
        method=METHOD, bucket_cap_mb=1e-6, min_compress_numel=100, exchange=EXCHANGE,
        overlap=overlap, **OPTS)
    ready = []
    if record:
        for name, p in m.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: ready.append(name))
    for k in range(3):
        x, y = batch(k, rank)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x, flip), y).backward()
        opt.step()
    return digest(m), ready

out = {{}}
# the reference: one order everywhere
out["same"], out["ready_same"] = run(False, True, True)
out["flipped"], out["ready_flipped"] = run(rank in FLIP, True, True)
out["flipped_no_overlap"], _ = run(rank in FLIP, False, False)
report(out)
"""

CASES = {
    "hierarchical": dict(method="signsgd", opts={}, exchange="hierarchical", flip=[1, 3],
                         np=4, env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1",
                                    "HVD_SIGNSGD_LOCAL_SIZE": "2"}),
    "threshold": dict(method="threshold", opts={"lam": 1e-12, "max_density": 1.0},
                      exchange="auto", flip=[1], np=2, env={}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_buckets_that_block_leave_in_bucket_order(mpi_job, case):
    c = CASES[case]
    code = JOB.format(method=c["method"], opts=c["opts"], exchange=c["exchange"],
                      flip=c["flip"])
    results = mpi_job(code, np=c["np"], launcher="mpirun", timeout=90, env=c["env"]).ok()
    for rank, r in enumerate(results):
        # the premise: backward finished the two buckets in the opposite order on these ranks
        want = ["p.weight", "q.weight"] if rank in c["flip"] else ["q.weight", "p.weight"]
        assert r["ready_flipped"][:2] == want, (rank, r["ready_flipped"])
        assert r["flipped"] == r["same"] and r["flipped_no_overlap"] == r["same"], rank
    assert len({r["same"] for r in results}) == 1
