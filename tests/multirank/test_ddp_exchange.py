"""The DDP hook on the sharded exchange (State(exchange="alltoall")): torchrun, Gloo, 2-4 ranks.

The hook's future must complete after both phases (all_to_all_single of shards, then the owners'
results by all_gather, and the allgather fallback when exact zeros are marked), started in the
same order on every rank while DDP keeps launching later buckets. The model has several DDP
buckets (bucket_cap_mb=0.02), so several sharded buckets are in flight at once.
"""
from __future__ import annotations

import pytest
from harness import run_job

PRELUDE = """
import hashlib
import torch, torch.distributed as dist
import hvd_signsgd, hvd_signsgd.ddp
from ddpcommon import *
rank, size = init()

def digest(model):
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()

def attempt(fn):
    try:
        fn()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"
"""


def ddp_job(code, np, timeout=300):
    return run_job(PRELUDE + code, np=np, launcher="torchrun", timeout=timeout,
                   env={"PYTHONFAULTHANDLER": "1"})


SAME = """
def train(method, exchange, zeros=False, steps=5, **opts):
    model, state = hooked(Reversed(), method, exchange=exchange, **opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = digest(model)
    for step in range(steps):
        x, y = batch(step, rank)
        if zeros:       # c's first weight column gets an exact 0 gradient: marked zeros
            x[:, 0] = 0.0
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    routes = sorted({state.engine.exchange.route(b) for b in state.engine.compressed})
    return dict(digest=digest(model), moved=digest(model) != before, routes=routes,
                steps=state.compression_stats()["steps"])

out = {}
for key, method, opts in (("signsgd", "signsgd", {}), ("signum", "signum", {}),
                          ("ssdm-mean", "ssdm", {"aggregation": "mean"}),
                          ("signsgd-mean", "signsgd", {"aggregation": "mean"})):
    out[key] = {ex: train(method, ex, **opts) for ex in ("allgather", "alltoall")}
out["zeros"] = {ex: train("signsgd", ex, zeros=True) for ex in ("allgather", "alltoall")}
out["squeeze"] = {ex: train("ef_signsgd", ex, double_squeeze=True) for ex in ("auto", "alltoall")}
out["default"] = train("signsgd", "auto")

# a NaN on the last rank: every rank raises from backward, the next step trains
model, state = hooked(Reversed(), "signum", exchange="alltoall")
opt = torch.optim.SGD(model.parameters(), lr=0.01)
def poisoned():
    loss = loss_of(model, 1, rank) * (float("nan") if rank == size - 1 else 1.0)
    loss.backward()
# the first line: DDP appends the traceback of whichever thread ran the callback
out["nan"] = attempt(poisoned).splitlines()[0]
opt.zero_grad()
loss_of(model, 2, rank).backward()
opt.step()
out["after_nan"] = digest(model)
out["after_nan_steps"] = state.compression_stats()["steps"]

out["refused"] = attempt(lambda: hooked(Reversed(), "ef_signsgd", exchange="alltoall"))
out["squeeze_allgather"] = attempt(lambda: hooked(Reversed(), "ef_signsgd",
                                                  exchange="allgather", double_squeeze=True))
out["mismatch"] = attempt(lambda: hooked(Reversed(), "signsgd",
                                         exchange="alltoall" if rank == 0 else "allgather"))
out["unknown"] = attempt(lambda: hooked(Reversed(), "signsgd",
                                        exchange="ring" if rank == size - 1 else "auto"))
out["hierarchical"] = attempt(lambda: hooked(Reversed(), "signsgd", exchange="hierarchical"))
report(out)
"""


@pytest.mark.parametrize("np", [2, 3, 4])
def test_alltoall_is_bit_identical_to_allgather_and_across_ranks(np):
    results = ddp_job(SAME, np).ok()
    r0 = results[0]
    for key in ("signsgd", "signum", "ssdm-mean", "signsgd-mean", "zeros"):
        ag, a2a = r0[key]["allgather"], r0[key]["alltoall"]
        assert a2a["routes"] == ["alltoall"] and ag["routes"] == ["allgather"], key
        assert a2a["digest"] == ag["digest"] and a2a["moved"], key
        assert a2a["steps"] == ag["steps"] == 5, key
    sq = r0["squeeze"]
    assert sq["auto"]["routes"] == sq["alltoall"]["routes"] == ["alltoall"]
    assert sq["auto"]["digest"] == sq["alltoall"]["digest"] and sq["auto"]["moved"]
    # the default is the Horovod front end's: "auto", whose cost model keeps the vote on the
    # allgather at these sizes and world sizes
    assert r0["default"]["routes"] == ["allgather"]
    assert r0["default"]["digest"] == r0["signsgd"]["allgather"]["digest"]
    assert r0["nan"].startswith("RuntimeError") and "NaN or Inf" in r0["nan"]
    assert f"rank(s) [{np - 1}]" in r0["nan"]
    assert r0["after_nan_steps"] == 1
    assert r0["refused"].startswith("ValueError") and "exchange='alltoall'" in r0["refused"]
    assert r0["squeeze_allgather"].startswith("ValueError") and \
        "exchange='alltoall' or 'auto'" in r0["squeeze_allgather"]
    assert r0["mismatch"].startswith("ValueError") and "exchange" in r0["mismatch"]
    assert r0["unknown"].startswith("ValueError") and "'ring'" in r0["unknown"] and \
        f"rank {np - 1}" in r0["unknown"]
    assert r0["hierarchical"].startswith("ValueError") and \
        "Horovod front end only" in r0["hierarchical"]
    for r in results[1:]:
        assert r == r0          # every digest and every error message, on every rank


BYTES = """
class Net(torch.nn.Module):     # sizes multiples of 8: no alignment gaps
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)
    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))

out = {}
for key, method, opts in (("signsgd", "signsgd", {}), ("signum", "signum", {}),
                          ("ssdm-mean", "ssdm", {"aggregation": "mean"}),
                          ("squeeze", "ef_signsgd", {"double_squeeze": True})):
    model = torch.nn.parallel.DistributedDataParallel(Net())   # one bucket (25 MB cap)
    state = hvd_signsgd.ddp.State(method, exchange="alltoall", **opts)
    model.register_comm_hook(state, hvd_signsgd.ddp.hook)
    for step in range(3):
        g = torch.Generator().manual_seed(step * 10 + rank)
        model(torch.randn(8, 32, generator=g)).square().sum().backward()
    s = state.compression_stats()
    (b,) = state.engine.compressed
    out[key] = {k: s[k] for k in ("bytes_sent", "bytes_received", "wire_bytes_sent",
                                  "dense_fp32_bytes", "control_bytes", "steps")}
    out[key]["size_exchange"] = s.get("size_exchange_bytes", 0)
    out[key]["aggregate"] = b.flat.tolist()
    out[key]["numel"] = b.layout.numel
report(out)
"""


def r4(x):
    return (x + 3) // 4 * 4


def expected(n, r, d, dense, aggregate, kind):
    """(sent, received, wire_sent) of rank r in one step: the formula of
    tests/multirank/test_exchange.py (phase 1 pieces to the other ranks, phase 2 the owners'
    results, a size exchange for the vote's variable-length results), with ef_signsgd's
    double squeeze (pieces carry the 2 tensors' float32 scales, a result one scale and one
    plane), plus the biases' float32 all_reduce."""
    from hvd_signsgd.exchange import count_bits, shard_bounds, shard_elements
    bounds = shard_bounds(-(-d // 8), n)
    scales = 2 if kind == "squeeze" else 0
    pieces = [16 + 4 * scales + r4(b1 - b0) for b0, b1 in bounds]
    msgs = []
    for (e0, k), (b0, b1) in zip(shard_elements(d, n), bounds):
        plane = r4(b1 - b0)
        if kind == "mean":
            msgs.append(16 + count_bits(n) * plane)
        elif kind == "squeeze":
            msgs.append(16 + 4 + plane)
        else:
            ties = sum(1 for v in aggregate[e0:e0 + k] if v == 0)
            msgs.append(16 + plane + (0 if ties == 0 else 4 * ties if 4 * ties < plane
                                      else plane))
    sizes = 8 if kind == "vote" else 0
    wire_dense = 2 * (n - 1) * dense // n
    sent = sum(pieces) - pieces[r] + msgs[r] + sizes + dense
    received = (n - 1) * pieces[r] + sum(msgs) - msgs[r] + (n - 1) * sizes + dense
    wire = sum(pieces) - pieces[r] + sum(msgs) - msgs[r] + sizes + wire_dense
    return sent, received, wire


@pytest.mark.parametrize("np", [2, 3, 4])
def test_alltoall_byte_counts_are_exact(np):
    large, small = 32 * 64 + 64 * 16, 64 + 16
    kinds = {"signsgd": "vote", "signum": "vote", "ssdm-mean": "mean", "squeeze": "squeeze"}
    ties = 0
    for rank, res in enumerate(ddp_job(BYTES, np).ok()):
        for key, s in res.items():
            assert s["numel"] == large
            want = expected(np, rank, large, 4 * small, s["aggregate"], kinds[key])
            assert (s["bytes_sent"], s["bytes_received"], s["wire_bytes_sent"]) == want, \
                (key, rank, s)
            assert s["size_exchange"] == (8 * np if kinds[key] == "vote" else 0)
            assert s["dense_fp32_bytes"] == 4 * (large + small)
            assert s["control_bytes"] == 8 * 4 * np
            assert s["steps"] == 3
            ties += sum(1 for v in s["aggregate"] if v == 0) if kinds[key] == "vote" else 0
    # with an even number of voters the vote has ties, whose results are longer
    assert (ties > 0) == (np % 2 == 0)


BUSY = """
import time

class Deep(torch.nn.Module):        # 6 DDP buckets of two 64x64 layers each
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(12))
    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x

out = {}
for exchange in ("allgather", "alltoall"):
    model = torch.nn.parallel.DistributedDataParallel(Deep(), bucket_cap_mb=0.017)
    state = hvd_signsgd.ddp.State("signsgd", exchange=exchange)
    model.register_comm_hook(state, hvd_signsgd.ddp.hook)
    finish = state.engine.finish_bucket
    def slow(b, finish=finish):
        time.sleep(0.05)    # callbacks that keep Gloo's worker threads busy
        return finish(b)
    state.engine.finish_bucket = slow
    for step in range(4):
        g = torch.Generator().manual_seed(step * 10 + rank)
        model(torch.randn(8, 64, generator=g)).square().sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    out[exchange] = dict(identical=identical_everywhere(grads),
                         steps=state.compression_stats()["steps"], buckets=len(state._layout))
report(out)
"""


def test_slow_callbacks_do_not_deadlock_the_hook():
    """The futures' callbacks run on Gloo's two worker threads while DDP's thread runs the hook
    of the next bucket, which blocks in the allgather's length exchange: a callback that
    waited for the hook's lock would leave no worker to run that exchange (a hang, seen with
    ResNet-50-sized models on 4 ranks). Slow callbacks and 6 buckets make it certain: the
    code before this test hung here."""
    for r in ddp_job(BUSY, 3, timeout=150).ok():
        for exchange in ("allgather", "alltoall"):
            assert r[exchange] == dict(identical=True, steps=4, buckets=6), (exchange, r)


SPARSE_DENSE = """
out = {}
for exchange in ("auto", "allgather"):
    model, state = hooked(Reversed(), "topk", exchange=exchange, ratio=0.45)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = digest(model)
    for step in range(3):
        x, y = batch(step, rank)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    s = state.compression_stats()
    out[exchange] = dict(identical=identical_everywhere(flat_params(model)),
                         moved=digest(model) != before, steps=s["steps"],
                         dense=s.get("sparse_dense_buckets", 0))
report(out)
"""


def test_topk_switches_to_a_dense_allreduce_through_the_hook():
    """Top-k at 45% on 3 ranks: the pairs (8 bytes each, 3 ranks) outweigh a float32
    allreduce, so under "auto" every compressed bucket goes dense; the hook chains that
    allreduce's future like the others. "allgather" keeps the pairs."""
    for r in ddp_job(SPARSE_DENSE, 3).ok():
        auto, pairs = r["auto"], r["allgather"]
        assert auto["identical"] and auto["moved"] and auto["steps"] == 3, auto
        assert auto["dense"] >= 1, auto
        assert pairs["identical"] and pairs["moved"] and pairs["dense"] == 0, pairs
