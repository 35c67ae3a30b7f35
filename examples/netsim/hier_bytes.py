"""Bytes on the host links of the hierarchical exchange against the flat allgather, on a
simulated cluster of hosts with several ranks each (netsim.sh, HSG_NETSIM_SLOTS ranks per
host):

    HSG_NETSIM_SLOTS=2 netsim.sh with 2 sh -c '"$HSG_NETSIM" mpirun -n 4 \\
        -x HOROVOD_DYNAMIC_PROCESS_SETS=1 python examples/netsim/hier_bytes.py --out r.json'

Every rank reads its host's link counter (/sys/class/net/net0 inside the host's network
namespace; the ranks of one host talk over its loopback, which that counter leaves out)
before and after `--steps` steps of signsgd on one bias-free weight of --dim^2 elements, for
exchange="allgather" and exchange="hierarchical". The model of what leaves a host per step
(Open MPI's ring allgatherv, which netsim.sh pins):

  allgather     the ring of the n ranks (consecutive ranks per host) leaves a host once, at
                its last rank, which forwards n - 1 payloads of P bytes:  (n - 1) * P
  hierarchical  each of the host's L ranks sends its slice payload P_l to the H - 1 ranks of
                its slice on the other hosts:  (H - 1) * sum_l P_l  (about (H - 1) * P)

so the factor is about (n - 1) / (H - 1): 3 for 2 hosts of 2. P and P_l are the ranks'
bytes_sent from compression_stats() (the payloads with their headers). The control record
(an allreduce of 8 * 4 * n bytes a step) is added as the ring allreduce moves it across; Horovod's
own coordination traffic flows all the time, so the idle rate is measured first and reported.
Rank 0 writes the JSON of both runs (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import horovod.torch as hvd
import torch

import hvd_signsgd


def tx_bytes(iface: str) -> int:
    return int((Path("/sys/class/net") / iface / "statistics" / "tx_bytes").read_text())


def barrier(tag: str) -> None:
    hvd.allreduce(torch.zeros(1), name=f"hier_bytes.barrier.{tag}", op=hvd.Sum)


def host_tx(iface: str) -> list[int]:
    """Every host's counter, in host order (read by its local rank 0, gathered)."""
    mine = tx_bytes(iface) if hvd.local_rank() == 0 else -1
    return [v for v in hvd.allgather_object(mine) if v >= 0]


def run(exchange: str, args) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(args.dim, args.dim, bias=False)
    opt = hvd_signsgd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-3), named_parameters=model.named_parameters(),
        method="signsgd", exchange=exchange, bucket_cap_mb=1e6)
    g = torch.Generator().manual_seed(hvd.rank())
    x = torch.randn(8, args.dim, generator=g)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step()                                     # process sets, Horovod's caches
    barrier(f"{exchange}.0")
    t0, before = time.perf_counter(), host_tx(args.iface)
    for _ in range(args.steps):
        step()
    barrier(f"{exchange}.1")
    after, window = host_tx(args.iface), time.perf_counter() - t0
    s = opt.compression_stats()
    sent = hvd.allgather_object(s["bytes_sent"])
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    same = hvd.allgather(w.view(1, -1), name=f"hier_bytes.w.{exchange}")
    n, L = hvd.size(), hvd.local_size()
    H = n // L
    control = 2 * (n - 1) * (8 * 4 * n) // n  # the step's control record, ring allreduce
    if exchange == "allgather":
        model_bytes = [(n - 1) * sent[h * L + L - 1] + control for h in range(H)]
    else:
        model_bytes = [(H - 1) * sum(sent[h * L:(h + 1) * L]) + control for h in range(H)]
    return {"exchange": exchange, "steps": args.steps, "window_s": window,
            "host_tx": [a - b for a, b in zip(after, before)],
            "model_per_step": model_bytes, "bytes_sent": sent,
            "local_bytes_sent": s.get("local_bytes_sent", 0),
            "identical": bool((same == same[0]).all())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--iface", default="net0")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    hvd.init()
    barrier("idle0")
    t0, before = time.perf_counter(), host_tx(args.iface)
    time.sleep(1.0)
    after, idle_s = host_tx(args.iface), time.perf_counter() - t0
    out = {"ranks": hvd.size(), "local_size": hvd.local_size(), "dim": args.dim,
           "hostname": os.uname().nodename,
           "idle_tx_per_s": [(a - b) / idle_s for a, b in zip(after, before)],
           "loadavg": Path("/proc/loadavg").read_text().split()[:3],
           "runs": [run(ex, args) for ex in ("allgather", "hierarchical")]}
    if hvd.rank() == 0:
        text = json.dumps(out, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
