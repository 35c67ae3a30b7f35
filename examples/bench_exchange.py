"""allgather against alltoall (the sharded exchange, hvd_signsgd.exchange) in one run.

    mpirun -np 5 python examples/bench_exchange.py --models resnet50 --methods signsgd,ssdm
    mpirun -np 4 python examples/bench_exchange.py --models d=262144,d=4194304 --steps 5

For each model (real shapes from bench_comm.py, or one tensor of d elements) and method, the
same gradients are synchronized with exchange="allgather" and exchange="alltoall", one step
after the other (so that a shared machine's load weighs on both alike). What is timed is
synchronize() alone, as in bench_comm.py (the slowest rank's time; median over --steps). Rank 0
prints, per row, the bytes one rank receives and sends on the wire per step (compression_stats:
bytes_received and the ring model wire_bytes_sent, averaged over the ranks) and the sync time,
for both exchanges and as alltoall / allgather ratios, and the route exchange="auto" takes for
the model's largest bucket. --out writes the rows as JSON.

The cost model's constants (exchange.ALPHA, BETA) are fitted from "d=" rows: BETA from the
slope of the allgather time over its received bytes, ALPHA from what alltoall's second
collective costs beyond its bytes (`--fit` prints both).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HOROVOD_CONTROLLER", "mpi")
os.environ.setdefault("HOROVOD_CPU_OPERATIONS", "mpi")

import horovod.torch as hvd  # noqa: E402
import torch  # noqa: E402
from bench_comm import MODELS, ShapeModel  # noqa: E402

import hvd_signsgd  # noqa: E402
from hvd_signsgd.exchange import choose  # noqa: E402


def shapes_of(spec: str):
    if spec.startswith("d="):
        return [("w", (int(spec[2:]),))]
    return MODELS[spec]()


def agree(x: float, op) -> float:
    return float(hvd.allreduce(torch.tensor([float(x)], dtype=torch.float64), op=op,
                               name="bench_exchange.agree"))


def run(spec: str, method: str, exchange: str, steps: int) -> dict:
    model = ShapeModel(shapes_of(spec))
    params = list(model.params)
    opt = hvd_signsgd.DistributedOptimizer(
        torch.optim.SGD(params, lr=0.01), named_parameters=model.named(spec), method=method,
        exchange=exchange)
    gen = torch.Generator().manual_seed(hvd.rank())
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    for p in params:
        p.grad = torch.empty_like(p)
    times, recv, wire = [], [], []
    for k in range(steps + 1):           # the first step is a warm-up
        for p, g in zip(params, grads):  # the aggregate overwrote p.grad
            p.grad.copy_(g)
        agree(0.0, hvd.Max)
        t0 = time.perf_counter()
        opt.synchronize()
        dt = agree(time.perf_counter() - t0, hvd.Max)
        with opt.skip_synchronize():
            opt.step()
        s = opt.compression_stats()
        if k:
            times.append(dt)
            recv.append(agree(s["bytes_received"], hvd.Sum) / hvd.size())
            wire.append(agree(s["wire_bytes_sent"], hvd.Sum) / hvd.size())
    eng = opt._engine
    largest = max(eng.compressed, key=lambda b: b.layout.numel, default=None)
    auto = (choose(largest.method, "auto", largest.layout.numel, hvd.size())
            if largest else "-")
    return {"seconds": statistics.median(times), "received": statistics.median(recv),
            "wire_sent": statistics.median(wire), "auto_route": auto}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50", help="comma list: resnet50, bert_base, "
                    "tiny, d=<elements>")
    ap.add_argument("--methods", default="signsgd,ssdm")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--fit", action="store_true", help="print ALPHA, BETA fitted from d= rows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    hvd.init()
    n = hvd.size()
    rows = []
    for spec in args.models.split(","):
        for method in args.methods.split(","):
            ag = run(spec, method, "allgather", args.steps)
            a2a = run(spec, method, "alltoall", args.steps)
            rows.append({"model": spec, "method": method, "ranks": n, "allgather": ag,
                         "alltoall": a2a,
                         "received_ratio": a2a["received"] / max(ag["received"], 1),
                         "wire_ratio": a2a["wire_sent"] / max(ag["wire_sent"], 1),
                         "time_ratio": a2a["seconds"] / ag["seconds"]})
    if hvd.rank() == 0:
        print(f"{'model':>12} {'method':>8} n  recv MB ag/a2a   ratio  wire ratio  "
              f"sync ms ag/a2a   ratio  auto")
        for r in rows:
            ag, a2a = r["allgather"], r["alltoall"]
            print(f"{r['model']:>12} {r['method']:>8} {n}  {ag['received'] / 1e6:7.3f}/"
                  f"{a2a['received'] / 1e6:7.3f}  {r['received_ratio']:5.2f}  "
                  f"{r['wire_ratio']:10.2f}  {1e3 * ag['seconds']:7.2f}/"
                  f"{1e3 * a2a['seconds']:7.2f}  {r['time_ratio']:5.2f}  {ag['auto_route']}")
        if args.fit:
            print(json.dumps(fit(rows)))
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    hvd.shutdown()


def fit(rows) -> dict:
    """Least squares t = a + BETA * received over the allgather rows of single tensors; then
    ALPHA = median over those rows of (t_a2a - BETA * received_a2a) - a: what the sharded
    exchange pays beyond its bytes (its second, dependent collective)."""
    pts = [(r["allgather"]["received"], r["allgather"]["seconds"]) for r in rows
           if r["model"].startswith("d=")]
    if len(pts) < 2:
        return {"error": "need two or more d= rows"}
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    beta = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    a = my - beta * mx
    extra = [r["alltoall"]["seconds"] - beta * r["alltoall"]["received"] - a for r in rows
             if r["model"].startswith("d=")]
    return {"BETA_s_per_byte": beta, "allgather_latency_s": a,
            "ALPHA_s": statistics.median(extra)}


if __name__ == "__main__":
    main()
