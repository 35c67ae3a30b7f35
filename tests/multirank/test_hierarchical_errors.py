"""exchange="hierarchical" under failure, in real jobs of 4 ranks faked as 2 hosts of 2
(HVD_SIGNSGD_LOCAL_SIZE=2, HOROVOD_DYNAMIC_PROCESS_SETS=1): a failure on one rank, or bad
input, ends in a clear error on every rank, never in a hang (each job has a short timeout).
"""
import pytest

ENV = {"HOROVOD_DYNAMIC_PROCESS_SETS": "1", "HVD_SIGNSGD_LOCAL_SIZE": "2"}

# A user's Method whose aggregate fails on one rank at one step (a bug, an out-of-memory):
# rank 1, local rank 1 of host 0, aggregates slice 1 of the bucket across hosts. Its host peer
# (rank 0) waits for the slices in the host's allgather; before the fix it waited forever.
CROSS_FAILURE = """
import torch, horovod.torch as hvd, hvd_signsgd
from hvd_signsgd.methods import SignSGD
from rankcommon import batch, digest, first_error
hvd.init()
rank = hvd.rank()

class Flaky(SignSGD):
    def aggregate(self, gathered, state, ctx):
        if rank == 1 and ctx.step == 1:
            raise RuntimeError("flaky aggregate on rank 1")
        return super().aggregate(gathered, state, ctx)

torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(33, 61, bias=False), torch.nn.Tanh(),
                        torch.nn.Linear(61, 5, bias=False))
opt = hvd_signsgd.DistributedOptimizer(
    torch.optim.SGD(m.parameters(), lr=0.01), named_parameters=m.named_parameters(),
    method=Flaky(), min_compress_numel=400, exchange="hierarchical")

def step(k):
    x, y = batch(k, rank)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()

step(0)
before = digest(m)
out = {"fail": first_error(lambda: step(1)), "unchanged": digest(m) == before}
# host 1 applied step 1, host 0 did not: the next step's control exchange finds the ranks at
# different steps, on every rank
out["next"] = first_error(lambda: step(2))
report(out)
"""


def test_cross_failure_reaches_host_peers(mpi_job):
    results = mpi_job(CROSS_FAILURE, np=4, launcher="mpirun", timeout=90, env=ENV).ok()
    host0 = [r["fail"] for r in results[:2]]
    # the same error on both ranks of the failing host, naming the cause and the slice
    assert host0[0] == host0[1], host0
    assert host0[0].startswith("ExchangeError") and "flaky aggregate on rank 1" in host0[0] \
        and "RuntimeError" in host0[0] and "slice 1" in host0[0], host0[0]
    assert all(r["unchanged"] for r in results[:2])
    # the other host's slice 1 aggregated on rank 3, so host 1 applied the step
    assert [r["fail"] for r in results[2:]] == [None, None]
    for r in results:
        assert r["next"] and r["next"].startswith("StepError") \
            and "different steps" in r["next"], r["next"]


# HVD_SIGNSGD_LOCAL_SIZE as each rank sees it; every case must end in the same ValueError on
# every rank (before the fix, int("abc") raised on rank 0 alone and the others waited).
BAD_LOCAL_SIZE = """
import os, torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import first_error, small_model
hvd.init()
rank = hvd.rank()
CASES = {"abc_on_rank0": ["abc", "2", "2", "2"], "zero": ["0"] * 4, "negative": ["-2"] * 4,
         "three_of_four": ["3"] * 4, "differ": ["2", "2", "4", "4"],
         "float": ["2.5"] * 4, "empty_on_rank3": ["2", "2", "2", ""]}
out = {}
for name, values in CASES.items():
    os.environ["HVD_SIGNSGD_LOCAL_SIZE"] = values[rank]
    m = small_model()
    out[name] = first_error(lambda: hvd_signsgd.DistributedOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
        method="signsgd", exchange="hierarchical"))
# not read by the other exchanges
m = small_model()
out["flat_ignores"] = first_error(lambda: hvd_signsgd.DistributedOptimizer(
    torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
    method="signsgd", exchange="allgather"))
report(out)
"""


@pytest.mark.parametrize("launcher", ["mpirun", "gloo"])
def test_bad_local_size_is_one_error_everywhere(mpi_job, launcher):
    results = mpi_job(BAD_LOCAL_SIZE, np=4, launcher=launcher, timeout=90, env=ENV).ok()
    want = {"abc_on_rank0": "rank 0: HVD_SIGNSGD_LOCAL_SIZE='abc'",
            "zero": "HVD_SIGNSGD_LOCAL_SIZE='0'", "negative": "HVD_SIGNSGD_LOCAL_SIZE='-2'",
            "three_of_four": "HVD_SIGNSGD_LOCAL_SIZE='3'",
            "differ": "local_size", "float": "HVD_SIGNSGD_LOCAL_SIZE='2.5'",
            "empty_on_rank3": "local_size"}
    for case, text in want.items():
        errors = [r[case] for r in results]
        assert len(set(errors)) == 1, (case, errors)         # the same message everywhere
        assert errors[0] and errors[0].startswith("ValueError") and text in errors[0], \
            (case, errors[0])
    assert all(r["flat_ignores"] is None for r in results)
