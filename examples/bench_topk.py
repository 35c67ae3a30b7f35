"""Top-k selection speed: torch.topk against the sampled-threshold path of topk_indices.

    python examples/bench_topk.py                      # 1M .. 25M elements, k = 0.1% and 1%
    python examples/bench_topk.py --sizes 4e6 --ratios 0.01 --threads 1 --repeat 5

Contenders, each returning the indices of the k largest |p_i| (p ~ N(0, 1) scaled per block, so
magnitudes are not identically distributed):
    torch.topk        torch.topk(|p|, k, sorted=False).indices: the raw op (unordered indices,
                      ties broken as torch likes)
    exact (full)      topk_indices' exact path on the whole tensor: the k-th value (torch.topk or
                      torch.kthvalue, whichever is faster for that k/d),
                      then the set {|p| > kth} plus the lowest-index ties, ascending
    topk_indices      what the topk method runs: candidates above a threshold estimated from a
                      sample (about 64 * d / k points), then the exact path on the candidates
Every contender's set is checked against topk_indices' set (equal as sets; torch.topk only up to
ties, which N(0, 1) data does not have). Prints one row per (size, ratio): best-of-N milliseconds.
"""
from __future__ import annotations

import argparse
import time

import torch

from hvd_signsgd.methods import sparse


def timed(fn, repeat):
    """Best of `repeat` (the least disturbed run on a shared machine) and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e6,4e6,16e6,25e6")
    ap.add_argument("--ratios", default="0.001,0.01")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of "
          f"{args.repeat}")
    print(f"{'elements':>10} {'ratio':>6} {'k':>8} {'torch.topk':>11} {'exact(full)':>12} "
          f"{'topk_indices':>13} {'speed-up':>9}")
    for d in (int(float(s)) for s in args.sizes.split(",")):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(d, generator=gen)
        p *= torch.rand(d // 1024 + 1, generator=gen).repeat_interleave(1024)[:d] * 10
        a = p.abs()
        for ratio in (float(r) for r in args.ratios.split(",")):
            k = max(1, int(ratio * d))
            t_raw, raw = timed(lambda a=a, k=k: torch.topk(a, k, sorted=False).indices,
                               args.repeat)
            t_full, full = timed(lambda a=a, k=k: sparse._exact_from(a, k), args.repeat)
            t_ours, ours = timed(lambda a=a, k=k: sparse.topk_indices(a, k), args.repeat)
            assert torch.equal(full, ours), "exact paths disagree"
            assert torch.equal(raw.sort().values, ours), "torch.topk selected another set"
            print(f"{d:>10} {ratio:>6.3%} {k:>8} {t_raw:>9.1f}ms {t_full:>10.1f}ms "
                  f"{t_ours:>11.1f}ms {t_raw / t_ours:>8.1f}x", flush=True)


if __name__ == "__main__":
    main()
