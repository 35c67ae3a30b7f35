"""exchange="hierarchical" (exchange.HierarchicalExchange) in real mpirun and horovodrun --gloo
jobs of 4 ranks, grouped as 2 "hosts" of 2 ranks, and of 6 ranks as 3 hosts
(HVD_SIGNSGD_LOCAL_SIZE=2: on one machine Horovod sees every rank as local). Horovod
process sets are added after hvd.init(), so the jobs run with HOROVOD_DYNAMIC_PROCESS_SETS=1;
without it every rank raises the same error.

The compressed bucket is one 61x33 weight, 2013 elements: 63 words of packed bits, cut into
host slices of 32 words (elements 0..1023) and 31 words (1024..2012). The 5x61 weight (305
elements) travels dense (min_compress_numel=400) in a float32 allreduce of all 4 ranks.
"""
import pytest

D, DENSE, SLICES = 61 * 33, 5 * 61, (1024, 989)
ENV = {"HOROVOD_DYNAMIC_PROCESS_SETS": "1", "HVD_SIGNSGD_LOCAL_SIZE": "2"}

JOB = """
import copy, torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import batch, digest, first_error
hvd.init()
rank, n = hvd.rank(), hvd.size()
L = 2
H = n // L
METHODS = [("signsgd", {}), ("signum", {}), ("ef_signsgd", {}), ("topk", {"ratio": 0.05}),
           ("ef_signsgd", {"double_squeeze": True}),
           ("threshold", {"lam": 1e-12, "max_density": 1.0})]

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(33, 61, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(61, 5, bias=False))

def make(method, opts, exchange="hierarchical"):
    m = model()
    return m, hvd_signsgd.DistributedOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.01), named_parameters=m.named_parameters(),
        method=method, min_compress_numel=400, exchange=exchange, seed=3, **opts)

def loss(m, k, poison=False):
    x, y = batch(k, rank)
    if poison:
        x[0, 0] = float("nan")
    return torch.nn.functional.cross_entropy(m(x), y)

def step(m, opt, k, poison=False):
    opt.zero_grad()
    loss(m, k, poison).backward()
    opt.step()

def raw_grads(m, k, name):
    # every rank's own gradient of the big weight, for the reference aggregates
    c = copy.deepcopy(m)
    loss(c, k).backward()
    return hvd.allgather(c[0].weight.grad.flatten().view(1, -1), name=name)

def host_means(g):
    # what the host's float32 allreduce with prescale 1/L gives (two addends: exact order)
    return (g.view(H, L, -1) * (1.0 / L)).sum(1)

out = {}
for method, opts in METHODS:
    key = method + ("-squeeze" if opts.get("double_squeeze") else "")
    m, opt = make(method, opts)
    before = digest(m)
    g = raw_grads(m, 0, "raw." + key)
    step(m, opt, 0)
    agg = m[0].weight.grad.flatten().clone()
    res = {}
    if key == "signsgd":
        # a vote of the hosts: sign(sum_h sign(host mean_h)); with 2 hosts a split is 0
        want = torch.sign(torch.sign(host_means(g)).sum(0))
        res["vote_exact"] = torch.equal(agg, want)
        res["ties"] = int((want == 0).sum())
    if key == "ef_signsgd":
        # first step, empty memory: mean over hosts of each slice's scaled sign
        # (||x||_1 / elements of the slice), one scale per slice of the one tensor
        want = torch.zeros(g.shape[1])
        for x in host_means(g):
            for a, b in ((0, 1024), (1024, 2013)):
                s = x[a:b]
                want[a:b] += torch.sign(s) * (s.abs().sum() / (b - a)) / H
        res["ef_close"] = bool(torch.allclose(agg, want, rtol=1e-5, atol=1e-7))
    for k in range(1, 6):
        step(m, opt, k)
    s = opt.compression_stats()
    sec = opt.state_dict()["hvd_signsgd"]
    res.update(digest=digest(m), moved=digest(m) != before, sent=s["bytes_sent"],
               received=s["bytes_received"], wire=s["wire_bytes_sent"],
               local_sent=s["local_bytes_sent"], local_received=s["local_bytes_received"],
               local_wire=s["local_wire_bytes_sent"],
               size_exchange=s.get("size_exchange_bytes", 0),
               dense=s.get("sparse_dense_buckets", 0),
               slices=list(sec["slices"]),
               state={k: int(v.numel()) for b in sec["buckets"] for k, v in b.items()})
    out[key] = res

# a NaN on one rank of the second host: every rank raises, every slice's memory is restored,
# and training goes on identically everywhere
m, opt = make("ef_signsgd", {})
step(m, opt, 0)
mem = [v.clone() for b in opt.state_dict()["hvd_signsgd"]["buckets"] for v in b.values()]
out["nan"] = first_error(lambda: step(m, opt, 1, poison=rank == n - 1))
after = [v for b in opt.state_dict()["hvd_signsgd"]["buckets"] for v in b.values()]
out["restored"] = all(torch.equal(x, y) for x, y in zip(mem, after))
step(m, opt, 2)
out["after_nan_digest"] = digest(m)
# a flat checkpoint cannot resume a hierarchical optimizer (its state is per slice)
mf, flat = make("ef_signsgd", {}, "allgather")
step(mf, flat, 0)
opt.load_state_dict(flat.state_dict())
out["flat_ckpt"] = first_error(lambda: step(m, opt, 3))
# refusals, the same on every rank
out["model_norm"] = first_error(lambda: make("stochastic_sign", {"norm": "model"}))
m, opt = make("signsgd", {})
step(m, opt, 0)
out["join"] = first_error(lambda: opt.join() if rank == n - 1 else step(m, opt, 1))
report(out)
"""


def r4(x):
    return (x + 3) // 4 * 4


def expected(rank, key):
    """(sent, received, wire, local_sent, local_received, local_wire) of one step.

    Across hosts (the counters' usual fields): this rank's slice payload to the one rank of
    the other host with its local rank (an allgather of 2; the sharded route for the double
    squeeze: shard pieces and owner results of 16 + 4 scales + round4(shard) and 16 + 4 +
    round4(shard)), plus the dense weight's float32 allreduce of 4 ranks. On the host (extra
    local_*): the bucket's float32 allreduce, 4 * 2013 bytes among 2 ranks, and the slices'
    allgather, a 4-byte status + 4 bytes per element, with a size exchange (8 bytes each way)
    because the two slices differ in length."""
    from hvd_signsgd import wire
    from hvd_signsgd.exchange import shard_bounds
    mine, other = SLICES[rank % 2], SLICES[1 - rank % 2]
    dense, wire_dense = 4 * DENSE, 2 * 3 * 4 * DENSE // 4
    if key == "ef_signsgd-squeeze":
        # the sharded route inside the slice: shards of its packed bits among the 2 hosts
        bounds = shard_bounds(-(-mine // 8), 2)
        pieces = [16 + 4 + r4(b1 - b0) for b0, b1 in bounds]
        j = rank // 2                                # this rank's host: its shard
        cross_sent = pieces[1 - j] + pieces[j]       # the other's piece, then my result
        cross_recv = pieces[j] + pieces[1 - j]       # its piece of my shard, its result
        cross_wire = 2 * pieces[1 - j]
    elif key == "threshold":
        # every coordinate passes: the 2 hosts' pairs (2 * (16 + 8 * slice)) exceed 8 bytes
        # per element of the slice, so the slice and a status slot per host go as a float32
        # allreduce of 2 ranks, after the size exchange of the lengths (8 bytes each way)
        cross_sent = cross_recv = cross_wire = 8 + 4 * (mine + 2)
    else:
        codec, scales, nnz = {"signsgd": ("sign", 0, 0), "signum": ("sign", 0, 0),
                              "ef_signsgd": ("scaled_sign", 1, 0),
                              "topk": ("sparse32", 0, -(-mine * 5 // 100))}[key]
        pay = wire.payload_nbytes(codec, mine, n_scales=scales, nnz=nnz)
        cross_sent = cross_recv = cross_wire = pay
    local = 4 * D
    local_sent = local + 4 + 4 * mine + 8
    local_recv = local + 4 + 4 * other + 8
    local_wire = 2 * 1 * local // 2 + 4 + 4 * other + 8
    return (cross_sent + dense, cross_recv + dense, cross_wire + wire_dense,
            local_sent, local_recv, local_wire)


@pytest.mark.parametrize("launcher,np", [("mpirun", 4), ("gloo", 4), ("mpirun", 6)])
def test_hierarchical_hosts_of_two(mpi_job, launcher, np):
    """2 hosts of 2 (exact bytes), and 3 hosts of 2: n = 6, not a power of two, an odd
    number of hosts voting (no ties), the same checks but the byte counts."""
    results = mpi_job(JOB, np=np, launcher=launcher, timeout=600, env=ENV).ok()
    hosts = np // 2
    for key in ("signsgd", "signum", "ef_signsgd", "topk", "ef_signsgd-squeeze", "threshold"):
        assert len({r[key]["digest"] for r in results}) == 1, f"{key}: ranks differ"
        assert results[0][key]["moved"], key
        for rank, r in enumerate(results):
            res = r[key]
            assert res["slices"] == [2, rank % 2]
            # the method state holds this rank's slice only
            assert set(res["state"].values()) <= {SLICES[rank % 2]}, (key, res["state"])
            if hosts == 2:
                got = (res["sent"], res["received"], res["wire"], res["local_sent"],
                       res["local_received"], res["local_wire"])
                assert got == expected(rank, key), (key, rank, got, expected(rank, key))
                # the slices' allgather (and threshold's lengths across hosts)
                assert res["size_exchange"] == (32 if key == "threshold" else 16), key
            assert res["dense"] == (key == "threshold"), key
    for r in results:
        assert r["signsgd"]["vote_exact"], "the hierarchical vote is not the hosts' vote"
        assert r["ef_signsgd"]["ef_close"], "ef_signsgd's first aggregate is off"
        assert r["nan"].startswith("NonFiniteGradientError"), r["nan"]
        assert r["restored"], "a slice's error memory changed in the failed step"
        assert r["flat_ckpt"].startswith("ValueError") and "slice" in r["flat_ckpt"], \
            r["flat_ckpt"]
        assert r["model_norm"].startswith("ValueError") and "hierarchical" in r["model_norm"]
        assert r["join"].startswith("StepError") and "hierarchical" in r["join"], r["join"]
    if hosts == 2:
        assert results[0]["signsgd"]["ties"] > 0     # two hosts disagree somewhere: vote 0
    else:
        assert results[0]["signsgd"]["ties"] == 0    # an odd number of hosts never ties
    assert len({r["after_nan_digest"] for r in results}) == 1


NO_SETS = """
import torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import first_error, small_model
hvd.init()
m = small_model()
err = first_error(lambda: hvd_signsgd.DistributedOptimizer(
    torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
    method="signsgd", exchange="hierarchical"))
bad = first_error(lambda: hvd_signsgd.exchange.make_exchange(
    hvd_signsgd.communicator.HorovodCommunicator(), "hierarchical").comm.split_local(3))
report({"err": err, "bad": bad})
"""


def test_hierarchical_needs_dynamic_process_sets(mpi_job):
    env = {"HOROVOD_DYNAMIC_PROCESS_SETS": "0", "HVD_SIGNSGD_LOCAL_SIZE": "2"}
    for r in mpi_job(NO_SETS, np=4, launcher="mpirun", timeout=200, env=env).ok():
        assert r["err"].startswith("ValueError") and "HOROVOD_DYNAMIC_PROCESS_SETS=1" in r["err"]
        assert r["bad"].startswith("ValueError") and "local_size=3" in r["bad"], r["bad"]


TORCH_SPLIT = """
import torch, torch.distributed as dist
from hvd_signsgd.communicator import TorchDistCommunicator
dist.init_process_group("gloo")
c = TorchDistCommunicator()
local, cross = c.split_local(2)
mine = torch.tensor([RANK], dtype=torch.uint8)
out = {"local": [local.size, local.rank], "cross": [cross.size, cross.rank],
       "local_got": local.allgather(mine, "l").wait().tolist(),
       "cross_got": cross.allgather(mine, "x").wait().tolist()}
out["bytes"] = [c.counters.bytes_sent, c.counters.extra.get("local_bytes_sent", 0)]
one_host, alone = c.split_local()          # every rank has the same host name here
out["one_host"] = [one_host.size, alone.size]
report(out)
"""


def test_torch_distributed_split(mpi_job):
    for rank, r in enumerate(mpi_job(TORCH_SPLIT, np=4, launcher="torchrun", timeout=200).ok()):
        assert r["local"] == [2, rank % 2] and r["cross"] == [2, rank // 2]
        assert r["local_got"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert r["cross_got"] == [rank % 2, rank % 2 + 2]
        assert r["bytes"] == [1, 1]          # the cross byte in the fields, the local one apart
        assert r["one_host"] == [4, 1]


LAST_HOST_LATE = """
import time, torch, horovod.torch as hvd, hvd_signsgd
from hvd_signsgd.exchange import HierarchicalExchange
from rankcommon import batch, digest, small_model
hvd.init()
rank = hvd.rank()
m = small_model()
opt = hvd_signsgd.DistributedOptimizer(
    torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
    method="signsgd", exchange="hierarchical", min_compress_numel=100)
STEPS, last = 3, [False]
if rank >= 2:       # the second host: its last step's host allgathers start 2 s late
    aggregate = HierarchicalExchange.aggregate
    def late(self, b, result):
        if last[0]:
            time.sleep(2.0)
        return aggregate(self, b, result)
    HierarchicalExchange.aggregate = late
for k in range(STEPS):
    last[0] = k == STEPS - 1
    x, y = batch(k, rank)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
report({"digest": digest(m)})
"""


def test_a_host_that_finishes_first_does_not_fail_the_others_by_exiting(mpi_job):
    """Horovod's shutdown at exit fails the collectives still pending on other ranks, those of
    process sets included. A hierarchical step ends in each host's own allgather, so the first
    host could exit while the second's is in flight; the exit barrier (communicator) waits."""
    job = mpi_job(LAST_HOST_LATE, np=4, launcher="mpirun", timeout=120, env=ENV)
    results = job.ok()
    assert len({r["digest"] for r in results}) == 1
