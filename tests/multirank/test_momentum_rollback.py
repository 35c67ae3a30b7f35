"""Signum and SSDM with their fused momentum kernels under real MPI: a NaN on one rank rolls
every rank's momentum back (no backup copy), bit for bit."""

ROLLBACK = """
import hashlib, torch, horovod.torch as hvd, hvd_signsgd
from hvd_signsgd.methods import make_method
from rankcommon import small_model, first_error, batch, digest
hvd.init()
r = hvd.rank()

def state_digest(opt):
    h = hashlib.sha256()
    for b in opt._engine.buckets:
        for k in sorted(b.state):
            h.update(b.state[k].contiguous().numpy().tobytes())
    return h.hexdigest()

def run(method, options, poisoned, fused=True):
    m = small_model()
    meth = make_method(method, **options)
    meth.fused = fused
    opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.002),
                                           named_parameters=m.named_parameters(), method=meth,
                                           min_compress_numel=100, num_groups=2)
    def one_step(k, poison=False):
        x, y = batch(k, r)
        opt.zero_grad()
        # NaN in the second layer's weight only: the other bucket is finite everywhere
        h = m[2].weight.register_hook(lambda g: g * float("nan")) if poison else None
        try:
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        finally:
            if h is not None:
                h.remove()
    errors = []
    for k in range(5):
        if poisoned and k in (1, 3):   # a failed step, then the same batch again
            errors.append(first_error(lambda: one_step(k, poison=(r == 1))))
        errors.append(first_error(lambda: one_step(k)))
    return {"errors": errors, "params": digest(m), "state": state_digest(opt),
            "backups": [sorted(b.backup) for b in opt._engine.buckets if "momentum" in b.state]}

out = {}
for method, options in (("signum", {}), ("ssdm", {}),
                        ("ssdm", {"beta": "schedule", "norm_type": "l2"})):
    label = method + "".join(f",{k}={v}" for k, v in options.items())
    out[label] = {"poisoned": run(method, options, True),
                  "clean": run(method, options, False),
                  "unfused": run(method, options, False, fused=False)}
report(out)
"""


def test_nan_on_one_rank_rolls_the_momentum_back_on_every_rank(mpi_job):
    """Rank 1's gradient is NaN in one bucket at steps 1 and 3. Every rank raises for those
    steps, and afterwards parameters and momentum are bit for bit those of a run that never
    saw them, on every rank; the unfused reference path (engine backup, fused=False) gives the
    same parameters and momentum too. The fused runs keep no backup of the momentum of their
    two compressed buckets."""
    results = mpi_job(ROLLBACK, np=3, timeout=300).ok()
    for label in results[0]:
        for rank, res in enumerate(results):
            p, c, u = res[label]["poisoned"], res[label]["clean"], res[label]["unfused"]
            failed = [e for e in p["errors"] if e]
            assert len(failed) == 2, (label, rank, p["errors"])
            assert all(e.startswith("NonFiniteGradientError") and "rank(s) [1]" in e
                       for e in failed), (label, failed)
            assert c["errors"] == [None] * 5 and u["errors"] == [None] * 5, label
            assert p["params"] == c["params"] == u["params"], (label, rank)
            assert p["state"] == c["state"] == u["state"], (label, rank)
            assert p["backups"] == [[], []] and u["backups"] == [["momentum"]] * 2, label
        # the momentum is per rank (own gradients); the parameters are the same everywhere
        assert len({res[label]["clean"]["params"] for res in results}) == 1, label
        assert len({res[label]["clean"]["state"] for res in results}) == 3, label
