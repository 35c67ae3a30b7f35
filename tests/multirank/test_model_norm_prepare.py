"""SSDM's whole-model norm (norm="model") needs every bucket before any payload can leave, but
each bucket's momentum pass and norm share (engine.prepare) runs as soon as backward readies
the bucket. That split must not change a bit: gradient hooks with overlap on, hooks with
overlap off, and gradients from torch.autograd.grad (no hook fires: synchronize() prepares and
sends every bucket at once, the path the split leaves unchanged) give the same parameters.
With hooks, the prepares are per bucket and start before backward has finished."""

JOB = """
import time, torch, horovod.torch as hvd, hvd_signsgd
from rankcommon import small_model, batch, digest
hvd.init()
rank = hvd.rank()

def run(mode, options):
    m = small_model()
    params = list(m.parameters())
    # one bucket per tensor: the two weights are compressed, the biases go dense
    opt = hvd_signsgd.DistributedOptimizer(
        torch.optim.SGD(params, lr=0.01), named_parameters=m.named_parameters(), method="ssdm",
        min_compress_numel=100, bucket_cap_mb=1e-6, overlap=mode == "overlap", **options)
    early, spans = [], []
    for k in range(4):
        x, y = batch(k, rank)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        if mode == "after":
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
        else:
            # the first layer's weight is the last gradient backward computes
            done = []
            h = m[0].weight.register_hook(lambda g: done.append(time.perf_counter()))
            loss.backward()
            h.remove()
        opt.step()
        ours = {b.index for b in opt._engine.compressed}
        steps = [(idx, t0) for idx, t0, _ in opt._engine.launch_times if set(idx) <= ours]
        spans.append(sorted(len(idx) for idx, _ in steps))
        if mode == "inline":
            early.append(sum(1 for idx, t0 in steps if len(idx) == 1 and t0 < done[0]))
    return {"digest": digest(m), "spans": spans, "early": early}

out = {mode: run(mode, {}) for mode in ("after", "inline", "overlap")}
out["l2"] = {mode: run(mode, {"norm_type": "l2", "beta": "schedule"})["digest"]
             for mode in ("after", "inline")}
report(out)
"""


def test_ssdm_prepares_each_bucket_during_backward_with_the_same_bits(mpi_job):
    for r in mpi_job(JOB, np=2, timeout=120).ok():
        assert r["inline"]["digest"] == r["after"]["digest"], r
        assert r["overlap"]["digest"] == r["after"]["digest"], r
        assert r["l2"]["after"] == r["l2"]["inline"], r
        # all at once without hooks: one prepare and one send of both weights' buckets
        assert all(s == [2, 2] for s in r["after"]["spans"]), r
        # with hooks: a prepare per bucket, then the send of both
        for mode in ("inline", "overlap"):
            assert all(s == [1, 1, 2] for s in r[mode]["spans"]), (mode, r)
        # the last layer's bucket is prepared inside backward, before the first layer's
        # gradient exists
        assert all(e >= 1 for e in r["inline"]["early"]), r
