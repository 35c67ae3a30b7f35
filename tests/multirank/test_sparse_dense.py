"""Sparse methods at n ranks (exchange.py, "Sparse methods at n ranks"): under
exchange="auto" a bucket whose ranks' pairs add up to more than 8 bytes per element goes as a
float32 allreduce, at 3 and 5 ranks, under mpirun and horovodrun --gloo.

rankcommon.small_model: the compressed bucket holds the 47x5 and 33x47 weights (235 at 0,
1551 at 240: 1791 elements, 1786 real); the biases go dense (55 float32 = 220 bytes). The
switch point: sum of payloads > 8 * 1791 = 14328 bytes.
  topk ratio 0.45: k = 106 + 698 = 804, payload 16 + 8 * 804 = 6448: dense at 3 and 5 ranks
  topk ratio 0.25: k = 59 + 388 = 447, payload 3592: pairs at 3 (10776), dense at 5 (17960)
  threshold, every coordinate: payload 16 + 8 * 1786 = 14304: dense at 3 and 5
"""
import pytest

D, DENSE = 1791, 220

JOB = """
import hashlib, torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, batch, digest, first_error
hvd.init()
rank, n = hvd.rank(), hvd.size()
CONFIGS = {"topk45": ("topk", {"ratio": 0.45}), "topk25": ("topk", {"ratio": 0.25}),
           "threshold_all": ("threshold", {"lam": 1e-12, "max_density": 1.0})}

def make(method, opts, exchange):
    m = small_model()
    opt = hvd_signsgd.DistributedOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.05), named_parameters=m.named_parameters(),
        method=method, min_compress_numel=100, exchange=exchange, **opts)
    (bucket,) = [b for b in opt._buckets if b.method is opt.method]
    return m, opt, bucket

def step(m, opt, k, poison=False):
    x, y = batch(k, rank)
    if poison:
        x[0, 0] = float("nan")
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()

def h(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()

out = {}
for name, (method, opts) in CONFIGS.items():
    res = {}
    for exchange in ("auto", "allgather"):
        m, opt, b = make(method, opts, exchange)
        step(m, opt, 0)
        s = opt.compression_stats()
        res[exchange] = {"error": h(b.state["error"]), "update": b.flat.tolist(),
                         "sent": s["bytes_sent"], "received": s["bytes_received"],
                         "wire": s["wire_bytes_sent"],
                         "dense": s.get("sparse_dense_buckets", 0)}
        for k in range(1, 4):
            step(m, opt, k)
        res[exchange]["digest"] = digest(m)
        res[exchange]["total_dense"] = opt.compression_stats().get("total_sparse_dense_buckets", 0)
    out[name] = res
# a NaN on the last rank on the dense route: every rank raises, the memory is as before
m, opt, b = make("topk", {"ratio": 0.45}, "auto")
step(m, opt, 0)
mem = b.state["error"].clone()
out["nan"] = first_error(lambda: step(m, opt, 1, poison=rank == n - 1))
out["restored"] = torch.equal(mem, b.state["error"])
step(m, opt, 2)
out["after_nan"] = digest(m)
report(out)
"""


@pytest.mark.parametrize("np", [3, 5])
def test_sparse_goes_dense_where_cheaper(mpi_job, launcher, np):
    results = mpi_job(JOB, np=np, launcher=launcher, timeout=400).ok()
    dense_at = {"topk45": True, "topk25": np == 5, "threshold_all": True}
    payload = {"topk45": 16 + 8 * 804, "topk25": 16 + 8 * 447, "threshold_all": 16 + 8 * 1786}
    for name, dense in dense_at.items():
        assert len({r[name]["auto"]["digest"] for r in results}) == 1, f"{name}: ranks differ"
        for r in results:
            a, g = r[name]["auto"], r[name]["allgather"]
            assert a["dense"] == int(dense) and a["total_dense"] == 4 * int(dense), name
            assert g["dense"] == 0
            # the error memory is what this rank selected, whatever the route
            assert a["error"] == g["error"], name
            # the same sum in another order: equal up to float32 rounding
            assert a["update"] == pytest.approx(g["update"], rel=1e-5, abs=1e-7), name
            size = 8 if name == "threshold_all" else 0
            if dense:
                # the bucket and one status slot per rank, as float32
                vec = 4 * (D + np)
                wire = 2 * (np - 1) * vec // np + 2 * (np - 1) * DENSE // np
                assert (a["sent"], a["received"], a["wire"]) == (
                    vec + size + DENSE, vec + size * (np - 1) + DENSE, wire + size), name
            else:
                assert a["sent"] == g["sent"] == payload[name] + DENSE
                assert a["received"] == g["received"] == (np - 1) * payload[name] + DENSE
                assert a["update"] == g["update"]        # the same path: bit for bit
            assert g["sent"] == payload[name] + size + DENSE
    for r in results:
        assert r["nan"].startswith("NonFiniteGradientError") and "densely" in r["nan"], r["nan"]
        assert f"rank(s) [{np - 1}]" in r["nan"], r["nan"]
        assert r["restored"]
    assert len({r["after_nan"] for r in results}) == 1
