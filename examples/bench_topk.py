"""Top-k speed: the topk method's encode + decode per step on a model's shapes, the previous
torch path against the native kernels; and selection alone on single tensors.

    python examples/bench_topk.py --threads 1          # ResNet-50 shapes, ratio 1% and 0.1%
    python examples/bench_topk.py --model none --sizes 1e6,4e6,16e6,25e6 --ratios 0.001,0.01

Per step (--model, default resnet50 with the shapes of examples/bench_comm.py, grouped into
buckets of --bucket-cap-mb in registration order as the wrapper does), one rank's work:
    encode  p = e + g; select per tensor; write the pairs payload; e <- p - q (every bucket)
    decode  split the gathered payloads of --ranks ranks and scatter-add them (every bucket)
Two implementations, on the same data, whose payloads and memories are checked to be equal:
    torch   the code before the native kernels: topk_indices per tensor (sampled threshold,
            nonzero, kthvalue), p[idx], Sparse.encode, p[idx] = vals - q; decode by zeros +
            index_add_ rank by rank
    native  TopK.encode / aggregate as shipped: kernels.topk_take_sum (one call per bucket:
            p = g + e, radix select, the EF update), kernels.sparse_sum
Then the encode's kernels alone, taking turns: add_finite then topk_take (the previous fused
path) against topk_take_sum (p formed inside the selection).
Prints best-of-N milliseconds per step, wall-clock and CPU time of the calling thread (the
steadier number on a shared machine), and the speed-ups; the native kernels use one core, so
compare with --threads 1 (torch's own ops may use more threads otherwise, and their CPU time is
then not all counted).

Selection alone (--sizes):
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
import math
import os
import time

import torch

from hvd_signsgd import kernels, make_method, wire
from hvd_signsgd.codecs import Layout
from hvd_signsgd.methods import StepContext, sparse


def timed(fn, repeat):
    """Best of `repeat` (the least disturbed run on a shared machine) and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times), out


# --- encode + decode per step on a model's shapes ------------------------------------------------

def legacy_encode(method, p, layout):
    """TopK's encode (after p = e + g) as it was before the native kernels."""
    a = p.abs()
    idx = torch.cat([o + sparse.topk_indices(a[o:o + s], k)
                     for (o, s), k in zip(layout.segments(), method.counts(layout))])
    vals = p[idx]
    q = method.codec.quantize(vals)
    msg = method.codec.encode(idx, q, layout.numel)
    p[idx] = vals - q
    return msg


def legacy_aggregate(codec, gathered, ranks, layout, out):
    out.zero_()
    for pl in wire.split(gathered, ranks, bucket="b", codec=codec.codec, n=layout.numel):
        idx, vals = codec.decode(pl)
        if idx is None:
            out.add_(vals)
        elif idx.numel():
            out.index_add_(0, idx, vals.to(torch.float32))
    return out.div_(ranks)


def buckets_of(sizes, cap_mb):
    """Greedy buckets of at most cap_mb MB (float32) in registration order."""
    out, cur, cur_bytes = [], [], 0
    for s in sizes:
        if cur and cur_bytes + 4 * s > cap_mb * 2**20:
            out.append(cur)
            cur, cur_bytes = [], 0
        cur.append(s)
        cur_bytes += 4 * s
    return [Layout.for_sizes(b) for b in out + ([cur] if cur else [])]


def model_step(model, ratio, args):
    """(torch ms, native ms) per step, best of args.repeat, on the model's shapes."""
    from bench_comm import MODELS  # the shapes; importing it does not start Horovod
    sizes = [math.prod(shape) for _, shape in MODELS[model]()]
    layouts = buckets_of(sizes, args.bucket_cap_mb)
    method = make_method("topk", ratio=ratio)
    gen = torch.Generator().manual_seed(0)
    grads = []          # per bucket, per rank: a flat gradient with per-tensor scales
    for lay in layouts:
        per_rank = []
        for _ in range(args.ranks):
            g = torch.zeros(lay.numel)
            for o, s in lay.segments():
                g[o:o + s] = torch.randn(s, generator=gen) * float(torch.rand(1, generator=gen))
            per_rank.append(g)
        grads.append(per_rank)
    # what every rank sends (native path; the torch path is checked to send the same bytes)
    gathered = []
    for lay, per_rank in zip(layouts, grads):
        msgs = []
        for r, g in enumerate(per_rank):
            state = method.init_state(lay)
            msgs.append(method.encode(g, state, StepContext(0, r, args.ranks, "b", 0, lay)))
            legacy = legacy_encode(method, g.clone(), lay)
            assert torch.equal(msgs[-1], legacy), "the payloads differ"
        gathered.append(torch.cat(msgs))

    # the update lands in the bucket itself, as in the wrapper (ctx.out): no fresh 100 MB
    # allocation (and its page faults) per step in either path
    outs = [torch.zeros(lay.numel) for lay in layouts]

    def run(native):
        states = [method.init_state(lay) for lay in layouts]   # the spare buffer, as in use
        t0, c0 = time.perf_counter(), time.thread_time()
        for b, lay in enumerate(layouts):
            ctx = StepContext(0, 0, args.ranks, "b", 0, lay, out=outs[b])
            if native:
                method.encode(grads[b][0], states[b], ctx)
                method.aggregate(gathered[b], states[b], ctx)
            else:
                legacy_encode(method, states[b]["error"].add_(grads[b][0]), lay)
                legacy_aggregate(method.codec, gathered[b], args.ranks, lay, outs[b])
        return 1e3 * (time.perf_counter() - t0), 1e3 * (time.thread_time() - c0)

    best = {}
    for native in (False, True):
        run(native)   # warm-up
        times = [run(native) for _ in range(args.repeat)]
        best[native] = tuple(min(t[i] for t in times) for i in (0, 1))
    fused = fused_encode_ab(method, layouts, [g[0] for g in grads], args.repeat)
    return best[False], best[True], sum(sizes), len(sizes), len(layouts), fused


def fused_encode_ab(method, layouts, grads, repeat):
    """The native encode's kernels alone, per step (every bucket), CPU ms, best of `repeat`
    taking turns: (add_finite then topk_take, topk_take_sum). The second forms p = g + e
    inside the selection (one pass less over p); both write the same p and pairs."""
    gen = torch.Generator().manual_seed(1)
    work = []
    for lay, g in zip(layouts, grads):
        segs = method.segments(lay)
        total = int(torch.minimum(segs[:, 1], segs[:, 2]).sum())
        e = torch.randn(lay.numel, generator=gen) * 0.1
        work.append((g, e, torch.empty(lay.numel), segs, torch.empty(total, dtype=torch.int32),
                     torch.empty(total)))

    def two_calls():
        for g, e, p, segs, idx, vals in work:
            kernels.add_finite(g, e, p)
            kernels.topk_take(p, segs, idx, vals)

    def one_call():
        for g, e, p, segs, idx, vals in work:
            kernels.topk_take_sum(g, e, p, segs, idx, vals)

    times = {two_calls: [], one_call: []}
    for _ in range(repeat + 1):      # the first round warms up
        for fn in times:
            c0 = time.thread_time()
            fn()
            times[fn].append(time.thread_time() - c0)
    return tuple(1e3 * min(times[fn][1:]) for fn in (two_calls, one_call))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50", help="shapes from bench_comm.py, or none")
    ap.add_argument("--model-ratios", default="0.01,0.001")
    ap.add_argument("--ranks", type=int, default=4, help="payloads decoded per bucket")
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ap.add_argument("--sizes", default="", help="selection alone on single tensors, e.g. "
                    "1e6,4e6,16e6,25e6")
    ap.add_argument("--ratios", default="0.001,0.01")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels "
          f"{kernels.backend()} ({kernels._native.isa() if kernels._native else '-'}), best of "
          f"{args.repeat}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.model != "none":
        print(f"encode + decode of {args.ranks} ranks' payloads per step, ms (wall / CPU)")
        print(f"{'model':>9} {'ratio':>6} {'torch wall':>11} {'native wall':>12} {'speed-up':>9} "
              f"{'torch CPU':>10} {'native CPU':>11} {'speed-up':>9}")
        fused = {}
        for ratio in (float(r) for r in args.model_ratios.split(",")):
            old, new, numel, tensors, n_buckets, fused[ratio] = model_step(args.model, ratio,
                                                                           args)
            print(f"{args.model:>9} {ratio:>6.3%} {old[0]:>11.1f} {new[0]:>12.1f} "
                  f"{old[0] / new[0]:>8.1f}x {old[1]:>10.1f} {new[1]:>11.1f} "
                  f"{old[1] / new[1]:>8.1f}x", flush=True)
        print(f"({numel} elements, {tensors} tensors, {n_buckets} buckets of <= "
              f"{args.bucket_cap_mb:g} MB)")
        print("encode kernels per step, CPU ms: add_finite then topk_take / topk_take_sum")
        for ratio, (two, one) in fused.items():
            print(f"{args.model:>9} {ratio:>6.3%} {two:>11.1f} {one:>12.1f} {two / one:>8.2f}x")
    if not args.sizes:
        return
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
