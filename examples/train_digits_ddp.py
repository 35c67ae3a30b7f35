"""Train a small MLP on scikit-learn's bundled digits with DDP and hvd_signsgd's comm hook.

The torch.distributed twin of examples/train_digits.py (same data, model, learning rates, RESULT
line and --out JSON); the only hvd_signsgd lines are the State and register_comm_hook.

    torchrun --standalone --nproc-per-node 2 examples/train_digits_ddp.py --method signum
    torchrun --standalone --nproc-per-node 4 examples/train_digits_ddp.py --method fp32

--method fp32 is plain DDP without a hook (its own float32 allreduce), the baseline.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

import hvd_signsgd.ddp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_digits as base  # noqa: E402  (data, model, learning rates, arguments)


def main(argv=None):
    args = base.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    dist.init_process_group("gloo")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    rank, size = dist.get_rank(), dist.get_world_size()

    (xtr, ytr), (xte, yte) = base.load_data(args.seed)
    xs, ys = base.shard(xtr, ytr, rank, size, args.shards)
    model = torch.nn.parallel.DistributedDataParallel(base.make_model(args.hidden))  # broadcasts

    d = base.DEFAULTS.get("none" if args.method == "fp32" else args.method, base.DEFAULTS["signum"])
    lr = args.lr if args.lr is not None else d["lr"]
    momentum = args.momentum if args.momentum is not None else d["momentum"]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                          dampening=d.get("dampening", 0.0) if args.momentum is None else 0.0,
                          weight_decay=args.weight_decay)
    state = None
    if args.method != "fp32":
        options = {**d.get("opts", {}), **base.method_options(args.opt)}
        state = hvd_signsgd.ddp.State(args.method, optimizer=opt, seed=args.seed, **options)
        model.register_comm_hook(state, hvd_signsgd.ddp.hook)

    n_params = sum(p.numel() for p in model.parameters())

    def stats():
        if state is not None:
            return state.compression_stats()
        fp32 = 4 * n_params * steps_done     # DDP's own allreduce: float32 gradients
        return {"method": "fp32", "bytes_sent": 4 * n_params, "compression_ratio": 1.0,
                "total_bytes_sent": fp32, "total_bytes_received": fp32,
                "total_dense_fp32_bytes": fp32}

    steps_per_epoch = len(ys) // args.batch_size
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.epochs * steps_per_epoch, unit="step", dynamic_ncols=True,
                   desc=f"{args.method} x{size}")
    history, t0, steps_done = [], time.time(), 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(ys), generator=gen)
        total_loss = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            opt.step()
            steps_done += 1
            total_loss += loss.item()
            if bar is not None:
                s = stats()
                bar.set_postfix(loss=f"{loss.item():.3f}", sent=f"{s['bytes_sent']}B/step",
                                ratio=f"x{s['compression_ratio']:.1f}")
                bar.update()
        s = stats()
        history.append({"epoch": epoch + 1, "train_loss": total_loss / steps_per_epoch,
                        "test_acc": base.accuracy(model.module, xte, yte),
                        "bytes_sent": s["total_bytes_sent"],
                        "fp32_bytes": s["total_dense_fp32_bytes"]})
        if bar is not None:
            bar.set_description(f"{args.method} x{size} epoch {epoch + 1} "
                                f"acc {history[-1]['test_acc']:.3f}")
    if bar is not None:
        bar.close()

    s = stats()
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    sums = [None] * size
    dist.all_gather_object(sums, checksum)
    result = {
        "method": s["method"], "ranks": size, "epochs": args.epochs, "lr": lr,
        "momentum": momentum, "shards": args.shards,
        "test_acc": history[-1]["test_acc"], "train_loss": history[-1]["train_loss"],
        "bytes_sent_per_rank": s["total_bytes_sent"],
        "bytes_received_per_rank": s["total_bytes_received"],
        "fp32_bytes_per_rank": s["total_dense_fp32_bytes"],
        "compression_ratio": s["total_dense_fp32_bytes"] / max(s["total_bytes_sent"], 1),
        "ranks_identical": len(set(sums)) == 1,
        "seconds": time.time() - t0,
        "history": history,
    }
    if rank == 0:
        print(f"RESULT method={args.method} ranks={size} epochs={args.epochs} "
              f"test_acc={result['test_acc']:.4f} bytes_sent_per_rank="
              f"{result['bytes_sent_per_rank']} fp32_bytes_per_rank="
              f"{result['fp32_bytes_per_rank']} compression_ratio="
              f"{result['compression_ratio']:.1f} ranks_identical={result['ranks_identical']}",
              flush=True)
        out = args.out or os.path.join("runs", f"train_digits_ddp-{args.method}-np{size}.json")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}", flush=True)
    dist.barrier()                 # no rank leaves while another is still in a collective
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
    # torch 2.13's Gloo threads can abort the interpreter's teardown ("terminate called
    # without an active exception") after a run that succeeded: leave without it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
