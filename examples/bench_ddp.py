"""Time DDP training steps with PyTorch's own communication hooks and with hvd_signsgd's.

    torchrun --standalone --nproc-per-node 4 examples/bench_ddp.py --steps 50

In one run, on the same model and data, one configuration after the other:
    fp32           DDP without a hook (its float32 allreduce)
    fp16           torch's fp16_compress_hook
    powersgd-r1/2/4  torch's PowerSGD hook, matrix_approximation_rank 1, 2, 4; its default
                   warm-up (start_powerSGD_iter=1000 plain allreduce steps) unless
                   --powersgd-start says otherwise: runs shorter than the warm-up time the
                   allreduce, and the script says so; all gradients in one DDP bucket
                   (with several, torch's PowerSGD hook aborts on Gloo: see run())
    signsgd, signum, ef_signsgd, topk-1%   hvd_signsgd.ddp.hook
Each configuration trains --warmup untimed steps, then --steps timed ones; rank 0 prints the
median step time, its ratio to fp32 (below 1: faster) and the bytes this rank sent per step
where they are known exactly (fp32 and fp16 from the gradient size, ours from
compression_stats()). The timings are of this machine's network and CPUs: on one host with
Gloo the exchange is cheap and encoding dominates; compression pays where bandwidth is low.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

import hvd_signsgd.ddp

OURS = {"signsgd": {}, "signum": {}, "ef_signsgd": {}, "topk-1%": {"ratio": 0.01}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps first (at least 2: DDP rebuilds its buckets after step 1)")
    p.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--powersgd-start", type=int, default=None,
                   help="start_powerSGD_iter (default: PowerSGD's own, 1000)")
    p.add_argument("--only", nargs="*", default=None, help="run only these configurations")
    return p.parse_args(argv)


def make_model(width, layers):
    torch.manual_seed(0)
    mods = [torch.nn.Linear(256, width), torch.nn.ReLU()]
    for _ in range(layers - 1):
        mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods, torch.nn.Linear(width, 10))


def configurations(args):
    ps_kw = {} if args.powersgd_start is None else {"start_powerSGD_iter": args.powersgd_start}
    out = [("fp32", None), ("fp16", lambda m: m.register_comm_hook(None,
                                                                  default_hooks.fp16_compress_hook))]
    for r in (1, 2, 4):
        def reg(m, r=r):
            st = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=r, **ps_kw)
            m.register_comm_hook(st, powersgd.powerSGD_hook)
            return st
        out.append((f"powersgd-r{r}", reg))
    for name, opts in OURS.items():
        def reg(m, name=name, opts=opts):
            st = hvd_signsgd.ddp.State(name.split("-")[0], **opts)
            m.register_comm_hook(st, hvd_signsgd.ddp.hook)
            return st
        out.append((name, reg))
    return [c for c in out if args.only is None or c[0] in args.only]


def run(args, name, register):
    # PowerSGD in one bucket: its hook starts its second allreduce from a future callback,
    # which with several buckets in flight starts collectives in different orders on different
    # ranks (Gloo aborts: "Received data size doesn't match expected size")
    kw = {"bucket_cap_mb": 1e6} if name.startswith("powersgd") else {}
    model = torch.nn.parallel.DistributedDataParallel(make_model(args.width, args.layers), **kw)
    state = register(model) if register else None
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(args.batch_size, 256, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    times = []
    for k in range(args.warmup + args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if k >= args.warmup:
            times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters())
    return statistics.median(times), n, state


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    rows, base = [], None
    for name, register in configurations(args):
        t, n, state = run(args, name, register)
        if isinstance(state, hvd_signsgd.ddp.State):
            sent = state.compression_stats()["bytes_sent"]
        else:
            sent = {"fp32": 4 * n, "fp16": 2 * n}.get(name)
        base = base if base is not None else t
        rows.append((name, t, sent))
        if rank == 0:
            print(f"BENCH config={name} ms_per_step={1e3 * t:.2f} ratio_to_fp32={t / base:.3f} "
                  f"bytes_sent_per_step={sent if sent is not None else '-'}", flush=True)
    if rank == 0:
        start = args.powersgd_start if args.powersgd_start is not None else 1000
        if args.warmup + args.steps <= start and any(r[0].startswith("powersgd") for r in rows):
            print(f"note: PowerSGD compresses from step {start} on; this run ({args.warmup} + "
                  f"{args.steps} steps) timed its warm-up allreduce", flush=True)
        print("| config | ms/step | vs fp32 | bytes sent/step |\n|---|---|---|---|")
        for name, t, sent in rows:
            print(f"| {name} | {1e3 * t:.2f} | {t / base:.2f} | "
                  f"{sent if sent is not None else '-'} |")
    dist.barrier()                 # no rank leaves while another is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # torch 2.13's Gloo threads can abort the interpreter's teardown ("terminate called
    # without an active exception") after a run that succeeded: leave without it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
