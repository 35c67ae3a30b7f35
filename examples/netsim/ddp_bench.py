"""DDP against PowerSGD on the simulated cluster: step time, interface bytes, time to accuracy.

Run by run_ddp_bench.sh, one torchrun per netsim host (`netsim.sh torchrun`); it also runs on
one machine (`torchrun --standalone --nproc-per-node 2 ddp_bench.py --iface lo ...`).

In one process group, one configuration after the other (CONFIGS):
    fp32            DDP without a hook (float32 allreduce)
    fp16            torch's fp16_compress_hook
    powersgd-rK     torch's PowerSGD hook, matrix_approximation_rank K = 1, 2, 4, with
                    start_powerSGD_iter = --powersgd-start (default 2, the smallest it allows:
                    every timed step is a compressed one; its default, 1000, would time only
                    the plain allreduce of its warm-up, i.e. fp32), and all gradients in ONE
                    DDP bucket: torch's PowerSGD hook starts its second allreduce from a
                    future callback (a Gloo thread), so with several buckets in flight the
                    ranks start collectives in different orders and Gloo aborts with a
                    collective mismatch ("Received data size doesn't match expected size";
                    seen here with 2 ranks on one machine as well)
    signsgd, signum, ef_signsgd, topk-1%   hvd_signsgd.ddp.hook (exchange "auto")
    signsgd-a2a     hvd_signsgd.ddp.hook with exchange="alltoall" (the sharded exchange)
and three parts:
  shapes  a model whose parameters have ResNet-50's shapes (bench_comm.resnet50_shapes; "tiny"
          for the smoke test) and a forward that costs almost nothing (the loss is a fixed
          random linear function of the parameters, so each rank's gradient is a fixed random
          tensor without exact zeros): the step time is DDP's gradient synchronisation;
  e2e     bench_comm's end-to-end WideMLP (~20 M parameters at width 2688), real forward and
          backward, batch --e2e-batch;
  digits  time to accuracy: the MLP of examples/train_digits.py on the digits data (each rank a
          shard), the learning rates of its DEFAULTS (fp32 / fp16 / PowerSGD use plain SGD's,
          "none"); the target is fp32's final test accuracy minus --target-drop; reported:
          the training wall time (evaluation excluded) at the end of the first epoch whose test
          accuracy reaches it, and the final accuracy.
Each part and configuration: --warmup untimed steps (DDP rebuilds its buckets after the
first), then --steps timed ones, each after a barrier; the median step time, and the bytes
the host's interface sent and received during the timed steps (/sys/class/net/IFACE/
statistics, the counters `netsim.sh counters` prints; read in each rank's own namespace, so
the warm-up, model broadcast and rendezvous are not counted) divided by the steps.
Rank 0 writes the raw JSON (--out) and a Markdown report beside it (.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

import hvd_signsgd.ddp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import bench_comm  # noqa: E402  (shapes, WideMLP)
import train_digits  # noqa: E402  (data, model, learning rates)

CONFIGS = ["fp32", "fp16", "powersgd-r1", "powersgd-r2", "powersgd-r4", "signsgd", "signum",
           "ef_signsgd", "topk-1%", "signsgd-a2a"]
OURS = {"signsgd": ("signsgd", {}), "signum": ("signum", {}), "ef_signsgd": ("ef_signsgd", {}),
        "topk-1%": ("topk", {"ratio": 0.01}),
        "signsgd-a2a": ("signsgd", {"exchange": "alltoall"})}
ONE_BIT = ("signsgd", "signum", "ef_signsgd", "signsgd-a2a")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--parts", default="shapes,e2e,digits")
    p.add_argument("--shapes", default="resnet50", choices=sorted(bench_comm.MODELS))
    p.add_argument("--steps", type=int, default=5, help="timed steps (shapes, e2e)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 2)")
    p.add_argument("--e2e-width", type=int, default=2688)
    p.add_argument("--e2e-batch", type=int, default=32)
    p.add_argument("--digits-epochs", type=int, default=20)
    p.add_argument("--digits-hidden", type=int, default=128)
    p.add_argument("--target-drop", type=float, default=0.01,
                   help="target accuracy = fp32's final test accuracy minus this")
    p.add_argument("--powersgd-start", type=int, default=2)
    p.add_argument("--iface", default="net0")
    p.add_argument("--rate", default="?", help="the link rate, for the report")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


# --- configurations -----------------------------------------------------------------------------

def ddp(module, name):
    """module in DDP as configuration `name` needs it (PowerSGD: one bucket, see above)."""
    kw = {"bucket_cap_mb": 1e6} if name.startswith("powersgd") else {}
    return torch.nn.parallel.DistributedDataParallel(module, **kw)


def register(model, name, args, opt=None, seed=0):
    """Install configuration `name` on DDP model; returns the hook state (or None)."""
    if name == "fp32":
        return None
    if name == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if name.startswith("powersgd-r"):
        st = powersgd.PowerSGDState(process_group=None,
                                    matrix_approximation_rank=int(name[len("powersgd-r"):]),
                                    start_powerSGD_iter=args.powersgd_start)
        model.register_comm_hook(st, powersgd.powerSGD_hook)
        return st
    method, opts = OURS[name]
    st = hvd_signsgd.ddp.State(method, optimizer=opt, seed=seed, **opts)
    model.register_comm_hook(st, hvd_signsgd.ddp.hook)
    return st


def counters(iface):
    base = f"/sys/class/net/{iface}/statistics"
    try:
        with open(f"{base}/tx_bytes") as f, open(f"{base}/rx_bytes") as g:
            return int(f.read()), int(g.read())
    except OSError:
        return None


def measured(args, step_fn, steps, warmup):
    """Run warmup untimed steps, then steps timed ones (a barrier before each); returns the
    median seconds and this rank's interface bytes (tx, rx) per timed step."""
    for _ in range(warmup):
        step_fn()
    times = []
    dist.barrier()
    c0 = counters(args.iface)
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t0)
    c1 = counters(args.iface)
    per = None if c0 is None else [(c1[i] - c0[i]) / steps for i in (0, 1)]
    return statistics.median(times), per, times


def exchange_of(state):
    if isinstance(state, hvd_signsgd.ddp.State):
        e = state.engine
        return sorted({e.exchange.route(b) for b in e.compressed}) or ["allreduce"]
    return None


# --- the parts -----------------------------------------------------------------------------------

class ShapeNet(torch.nn.Module):
    """Parameters of the given shapes; the loss is sum_i <p_i, c_i> for this rank's fixed
    random c_i, so the gradient of p_i is c_i and the forward costs one pass over them."""

    def __init__(self, shapes):
        super().__init__()
        self.params = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(s))
                                             for _, s in shapes)

    def forward(self, coefs):
        return sum((p * c).sum() for p, c in zip(self.params, coefs))


def part_shapes(args, name):
    shapes = bench_comm.MODELS[args.shapes]()
    model = ddp(ShapeNet(shapes), name)
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    # no exact zeros: randn draws a few in 25 M, and one exact zero (sign(0) = 0, marked)
    # sends the sharded exchange to its allgather fallback in every step
    coefs = [torch.randn(s, generator=g) for _, s in shapes]
    for c in coefs:
        c[c == 0] = 1.0
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    state = register(model, name, args, opt)

    def step():
        opt.zero_grad()
        model(coefs).backward()
        opt.step()

    t, per, times = measured(args, step, args.steps, args.warmup)
    numel = sum(p.numel() for p in model.parameters())
    return dict(seconds=t, times=times, iface=per, numel=numel, exchange=exchange_of(state),
                stats_bytes_sent=_ours_sent(state))


def part_e2e(args, name):
    torch.manual_seed(0)
    model = ddp(bench_comm.WideMLP(width=args.e2e_width), name)
    g = torch.Generator().manual_seed(7919 + dist.get_rank())
    x = torch.randn(args.e2e_batch, 1024, generator=g)
    y = torch.randint(0, 1000, (args.e2e_batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    state = register(model, name, args, opt)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    t, per, times = measured(args, step, args.steps, args.warmup)
    numel = sum(p.numel() for p in model.parameters())
    return dict(seconds=t, times=times, iface=per, numel=numel, exchange=exchange_of(state),
                stats_bytes_sent=_ours_sent(state))


def _ours_sent(state):
    if isinstance(state, hvd_signsgd.ddp.State):
        return state.compression_stats()["bytes_sent"]
    return None


def part_digits(args, name, seed=0):
    rank, size = dist.get_rank(), dist.get_world_size()
    (xtr, ytr), (xte, yte) = train_digits.load_data(seed)
    xs, ys = train_digits.shard(xtr, ytr, rank, size, "iid")
    torch.manual_seed(seed)
    model = ddp(train_digits.make_model(args.digits_hidden), name)
    key = OURS[name][0] if name in OURS else "none"
    d = train_digits.DEFAULTS.get(key, train_digits.DEFAULTS["signum"])
    opt = torch.optim.SGD(model.parameters(), lr=d["lr"], momentum=d["momentum"],
                          dampening=d.get("dampening", 0.0))
    if name in OURS:
        method, opts = OURS[name]
        state = hvd_signsgd.ddp.State(method, optimizer=opt, seed=seed,
                                      **{**d.get("opts", {}), **opts})
        model.register_comm_hook(state, hvd_signsgd.ddp.hook)
    else:
        register(model, name, args)
    batch = 32
    per_epoch = len(ys) // batch
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    history, train_s, steps = [], 0.0, 0
    dist.barrier()
    c0 = counters(args.iface)
    for _ in range(args.digits_epochs):
        dist.barrier()
        t0 = time.perf_counter()
        perm = torch.randperm(len(ys), generator=gen)
        for i in range(per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
            steps += 1
        dist.barrier()
        train_s += time.perf_counter() - t0
        history.append((train_s, train_digits.accuracy(model.module, xte, yte)))
    c1 = counters(args.iface)
    per = None if c0 is None else [(c1[i] - c0[i]) / steps for i in (0, 1)]
    return dict(history=history, final_acc=history[-1][1], seconds=train_s, steps=steps,
                iface=per, lr=d["lr"], momentum=d["momentum"])


# --- report --------------------------------------------------------------------------------------

def _mb(x):
    return "-" if x is None else f"{x / 1e6:.2f}"


def report(raw) -> str:
    meta = raw["meta"]
    lines = [f"# DDP communication hooks on the simulated cluster ({meta['hosts']} hosts, "
             f"{meta['rate']})", "",
             f"Machine: {meta['machine']}; load average before / after: "
             f"{meta['load_before']} / {meta['load_after']} (shared, not idle). torch "
             f"{meta['torch']}, Gloo over the netns veths (TCP), one rank per host. Started "
             f"{meta['started']}, {meta['wall_s']:.0f} s in all. PowerSGD: "
             f"start_powerSGD_iter={meta['powersgd_start']} (every timed step compressed), all "
             f"gradients in one DDP bucket (with several, torch's PowerSGD hook aborts on Gloo "
             f"with a collective mismatch: it starts collectives from future callbacks); "
             f"the others DDP's default buckets (25 MB).",
             "", "Bytes: the host interface's tx/rx counters over the timed steps, per step and "
             "rank (mean over ranks), including TCP/IP headers and Gloo's own traffic.", ""]
    for part, title in (("shapes", f"Gradient shapes of {meta['shapes']} "
                                   f"(synchronisation only, cheap forward)"),
                        ("e2e", "End-to-end WideMLP (real forward and backward)")):
        rows = raw.get(part)
        if not rows:
            continue
        base = rows.get("fp32", {}).get("seconds")
        lines += [f"## {title}", "", f"{meta['steps']} timed steps after {meta['warmup']} "
                  f"warm-up; {next(iter(rows.values()))['numel']:,} parameters.", "",
                  "| config | ms/step (median) | vs fp32 | tx MB/step/rank | rx MB/step/rank "
                  "| bytes vs fp32 | exchange |", "|---|---|---|---|---|---|---|"]
        fp32_tx = _mean_tx(rows.get("fp32"))
        for name, r in rows.items():
            tx, rx = _mean_tx(r), _mean_rx(r)
            lines.append(
                f"| {name} | {1e3 * r['seconds']:.0f} | "
                f"{r['seconds'] / base:.2f} | {_mb(tx)} | {_mb(rx)} | "
                f"{'-' if tx is None or not fp32_tx else f'{tx / fp32_tx:.3f}'} | "
                f"{','.join(r['exchange']) if r['exchange'] else '-'} |"
                if base else f"| {name} | {1e3 * r['seconds']:.0f} | - | {_mb(tx)} | {_mb(rx)} "
                f"| - | - |")
        lines.append("")
    dig = raw.get("digits")
    if dig:
        target = raw["digits_target"]
        lines += ["## Time to accuracy: digits MLP", "",
                  f"{meta['digits_epochs']} epochs; target = fp32's final test accuracy "
                  f"minus {meta['target_drop']:.2f} = {target:.4f}; time = training wall time "
                  f"(evaluation excluded) at the end of the first epoch at or above it.", "",
                  "| config | time to target (s) | epochs | final acc | total train s | "
                  "tx kB/step/rank | lr, momentum |", "|---|---|---|---|---|---|---|"]
        for name, r in dig.items():
            tt = r.get("time_to_target")
            lines.append(f"| {name} | {'not reached' if tt is None else f'{tt:.2f}'} | "
                         f"{r.get('epochs_to_target') or '-'} | {r['final_acc']:.4f} | "
                         f"{r['seconds']:.1f} | "
                         f"{'-' if _mean_tx(r) is None else f'{_mean_tx(r) / 1e3:.1f}'} | "
                         f"{r['lr']}, {r['momentum']} |")
        lines.append("")
    lines += ["## Verdict (computed)", "", *verdict(raw), ""]
    return "\n".join(lines)


def _mean_tx(r):
    if not r or r.get("iface_all") is None:
        return None
    return statistics.mean(x[0] for x in r["iface_all"])


def _mean_rx(r):
    if not r or r.get("iface_all") is None:
        return None
    return statistics.mean(x[1] for x in r["iface_all"])


def verdict(raw) -> list[str]:
    out = []
    for part in ("shapes", "e2e"):
        rows = raw.get(part) or {}
        ours = {k: v for k, v in rows.items() if k in ONE_BIT}
        if "powersgd-r4" not in rows or not ours:
            continue
        best = min(ours, key=lambda k: ours[k]["seconds"])
        a, b = ours[best]["seconds"], rows["powersgd-r4"]["seconds"]
        out.append(f"- {part}: best 1-bit method {best} {1e3 * a:.0f} ms/step vs PowerSGD "
                   f"rank 4 {1e3 * b:.0f} ms/step: "
                   + ("matches or beats it" if a <= b * 1.05 else
                      f"slower by {100 * (a / b - 1):.0f}%")
                   + f" (ratio {a / b:.2f}).")
    dig = raw.get("digits") or {}
    if "powersgd-r4" in dig:
        ours = {k: v for k, v in dig.items() if k in ONE_BIT}
        ps = dig["powersgd-r4"]
        for k, v in ours.items():
            out.append(f"- digits: {k} reaches the target in "
                       f"{_fmt_t(v.get('time_to_target'))} (final {v['final_acc']:.4f}) vs "
                       f"PowerSGD rank 4 {_fmt_t(ps.get('time_to_target'))} (final "
                       f"{ps['final_acc']:.4f}).")
    return out


def _fmt_t(t):
    return "never" if t is None else f"{t:.2f} s"


# --- main ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, size = dist.get_rank(), dist.get_world_size()
    configs = args.configs.split(",")
    parts = args.parts.split(",")
    hosts = [None] * size
    dist.all_gather_object(hosts, socket.gethostname())
    t_start = time.time()
    raw = {"meta": dict(hosts=size, host_names=hosts, distinct_hosts=len(set(hosts)),
                        rate=args.rate, shapes=args.shapes, steps=args.steps,
                        warmup=args.warmup, powersgd_start=args.powersgd_start,
                        digits_epochs=args.digits_epochs, target_drop=args.target_drop,
                        torch=torch.__version__, machine=_machine(),
                        load_before=_load(), configs=configs,
                        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))}
    fns = {"shapes": part_shapes, "e2e": part_e2e, "digits": part_digits}
    for part in parts:
        raw[part] = {}
        for name in configs:
            r = fns[part](args, name)
            everyone = [None] * size
            dist.all_gather_object(everyone, r["iface"])
            r["iface_all"] = None if any(x is None for x in everyone) else everyone
            raw[part][name] = r
            if rank == 0:
                print(f"DDPBENCH part={part} config={name} seconds={r['seconds']:.4f} "
                      f"tx_per_step={_mean_tx(r)} load={_load()}", flush=True)
        if part == "digits" and "fp32" in raw[part]:
            target = raw[part]["fp32"]["final_acc"] - args.target_drop
            raw["digits_target"] = target
            for r in raw[part].values():
                hit = [(i, t) for i, (t, a) in enumerate(r["history"]) if a >= target - 1e-9]
                r["time_to_target"] = hit[0][1] if hit else None
                r["epochs_to_target"] = hit[0][0] + 1 if hit else None
    raw["meta"]["load_after"] = _load()
    raw["meta"]["wall_s"] = time.time() - t_start
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(raw, f, indent=1)
        md = os.path.splitext(args.out)[0] + ".md"
        with open(md, "w") as f:
            f.write(report(raw))
        print(f"wrote {args.out} and {md}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _machine():
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}"


if __name__ == "__main__":
    main()
    # torch 2.13's Gloo threads can abort the interpreter's teardown: leave without it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
