"""Throughput of the sign kernels against the machine's memory bandwidth (not a test).

    .venv/bin/python examples/bench_kernels.py [--log2n 24] [--repeat 10]   (or: make bench)

On 2^24-element inputs, one thread everywhere (torch.set_num_threads(1); the native kernels
are single-threaded): the read bandwidth (numpy sum of the float32 array), numpy.packbits,
the torch-op fallback and the native kernels; votes for n_ranks in {2, 4, 8, 16, 64} against
unpacking every rank to float32 and summing in torch; the fused encodes (ef_sign, and
signum's and ssdm's momentum kernels) against the unfused code they replace. Times are the
best of --repeat runs (wall clock; --clock cpu counts this thread's CPU time instead, which
stays meaningful when other processes share the cores); pack allocates its output like the
API does, unpack/vote write into a reused one. Run it on a quiet machine.
"""
import argparse
import os
import platform
import time

import numpy as np
import torch

from hvd_signsgd import kernels
from hvd_signsgd.kernels import _torch

CLOCK = time.perf_counter


def best_time(fn, repeat, budget=3.0):
    """Best time of up to `repeat` runs (fewer when one run is slow), after a warm-up."""
    start = CLOCK()
    fn()
    first = CLOCK() - start
    runs = max(1, min(repeat, int(budget / max(first, 1e-9))))
    best = first
    for _ in range(runs):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Table:
    def __init__(self, n):
        self.n = n
        self.rows = []

    def add(self, name, seconds, read_bytes, note=""):
        self.rows.append((name, seconds, read_bytes, note))
        return seconds

    def print(self):
        head = f"| {'kernel':<44} | {'ms':>8} | {'G elem/s':>8} | {'read GB/s':>9} | note"
        print(head)
        print("|" + "-" * 46 + "|" + "-" * 10 + "|" + "-" * 10 + "|" + "-" * 11 + "|------")
        for name, s, read, note in self.rows:
            print(f"| {name:<44} | {s * 1e3:8.2f} | {self.n / s / 1e9:8.2f} | "
                  f"{read / s / 1e9:9.1f} | {note}")


FUSED_NOTE = ("\nFused encodes: 'bound' is the time to move the kernel's own streams (bytes read "
              "+ written) at the read bandwidth measured above; 'of bound' = bound / time "
              "(the target is >= 0.5).")


def unfused_ef_sign(g, e, layout):
    """What ef_signsgd did before the fused kernel: e += g, zeros, scales, pack, residual."""
    from hvd_signsgd.codecs import ScaledSign, count_zeros
    p = e.add_(g)
    z = count_zeros(p, layout)
    scales = ScaledSign.scales(p, layout, zeros=z)
    msg = ScaledSign().encode(p, layout, scales, zeros=z)
    ScaledSign.subtract_local(p, scales, layout, zeros=z)
    return msg


def fused_encodes(t, n, rep, bw, rng):
    """ef_sign and ef_sign_deferred (ef_signsgd's one-pass encode) over one n-element tensor
    and over tensors of 2^16 and 2^20 elements; streams: g, e read, e_out written (4 bytes
    each), sign bits and zero plane written (n/8 each). ef_sign reads g and e a second time
    (from the cache when a tensor fits), ef_sign_deferred once."""
    from hvd_signsgd.codecs import Layout, ScaledSign, segment_pairs
    g = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
    e = torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.1)
    e_out = torch.empty(n)
    streams = 12 * n + 2 * (n / 8)
    bound = streams / (4 * n / bw)
    for seg in (n, 1 << 20, 1 << 16):
        if seg > n:
            continue
        layout = Layout.for_sizes([seg] * (n // seg))
        segs = segment_pairs(layout)
        s = best_time(lambda segs=segs: kernels.ef_sign(g, e, e_out, segs), rep)
        t.add(f"native ef_sign kernel, tensors of 2^{seg.bit_length() - 1}", s, 8 * n,
              f"bound {bound * 1e3:.2f} ms: {bound / s:.2f} of bound")
        # the same streams in one pass: e is the last p, its residual formed in the kernel
        prev = torch.full((segs.shape[0],), 0.1)
        s_d = best_time(lambda segs=segs, prev=prev:
                        kernels.ef_sign_deferred(g, e, prev, e_out, segs), rep)
        t.add(f"native ef_sign_deferred, tensors of 2^{seg.bit_length() - 1}", s_d, 8 * n,
              f"bound {bound * 1e3:.2f} ms: {bound / s_d:.2f} of bound; "
              f"{s / s_d:.2f}x ef_sign's speed")
    layout = Layout.for_sizes([1 << 20] * (n >> 20)) if n >= 1 << 20 else Layout.for_sizes([n])
    codec = ScaledSign()
    s = best_time(lambda: codec.encode_fused(g, e, e_out, layout), rep)
    t.add("ScaledSign.encode_fused (kernel + payload)", s, 8 * n,
          f"{bound / s:.2f} of bound")
    work = e.clone()
    s_old = best_time(lambda: unfused_ef_sign(g, work, layout), max(1, rep // 3))
    t.add("unfused ef_signsgd encode (before)", s_old, 8 * n, f"fused is {s_old / s:.1f}x faster")


def unfused_ecx(u, d1, d2, layout, alpha):
    """What ecx did before its fused kernel: x = u + (2 - alpha) d1 - (1 - alpha) d2 in torch
    ops, zeros, scales, pack, q, then delta2 <- delta1 (a copy) and delta1 <- x - q."""
    from hvd_signsgd.codecs import ScaledSign, count_zeros
    codec = ScaledSign()
    x = u + (2.0 - alpha) * d1 - (1.0 - alpha) * d2
    z = count_zeros(x, layout)
    scales = codec.scales(x, layout, zeros=z)
    msg = codec.encode(x, layout, scales, zeros=z)
    q = codec.decompress_local(x, scales, layout, zeros=z)
    d2.copy_(d1)
    torch.sub(x, q, out=d1)
    return msg


def fused_ecx(t, n, rep, bw, rng, alpha=0.1):
    """ecx_sign (ErrorCompensatedX) over one n-element tensor and over tensors of 2^16 and 2^20
    elements, two-pass (ecx_sign) and one-pass (ecx_sign_deferred: both memories kept as
    earlier p's, their residuals formed in the kernel); streams: u, delta1, delta2 read, d_out
    written (4 bytes each), sign bits and zero plane written (n/8 each). Then the method's
    encode, one-pass, two-pass and unfused (the old torch path, and the bit-identical
    reference ecx keeps for the tests)."""
    from hvd_signsgd.codecs import Layout, ScaledSign, segment_pairs
    from hvd_signsgd.methods import StepContext, make_method
    u = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
    d1 = torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.1)
    d2 = torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.1)
    d_out = torch.empty(n)
    streams = 16 * n + 2 * (n / 8)
    bound = streams / (4 * n / bw)
    for seg in (n, 1 << 20, 1 << 16):
        if seg > n:
            continue
        layout = Layout.for_sizes([seg] * (n // seg))
        segs = segment_pairs(layout)
        s = best_time(lambda segs=segs: kernels.ecx_sign(u, d1, d2, d_out, segs, alpha), rep)
        t.add(f"native ecx_sign kernel, tensors of 2^{seg.bit_length() - 1}", s, 12 * n,
              f"bound {bound * 1e3:.2f} ms: {bound / s:.2f} of bound")
        s1, s2 = (torch.full((segs.shape[0],), v) for v in (0.1, 0.05))
        s_d = best_time(lambda segs=segs, s1=s1, s2=s2: kernels.ecx_sign_deferred(
            u, d1, s1, d2, s2, d_out, segs, alpha), rep)
        t.add(f"native ecx_sign_deferred, tensors of 2^{seg.bit_length() - 1}", s_d, 12 * n,
              f"bound {bound * 1e3:.2f} ms: {bound / s_d:.2f} of bound; "
              f"{s / s_d:.2f}x ecx_sign's speed")
    layout = Layout.for_sizes([1 << 20] * (n >> 20)) if n >= 1 << 20 else Layout.for_sizes([n])
    s = best_time(lambda: ScaledSign().encode_ecx(u, d1, d2, d_out, layout, alpha), rep)
    t.add("ScaledSign.encode_ecx (kernel + payload)", s, 12 * n, f"{bound / s:.2f} of bound")
    ctx = StepContext(step=0, rank=0, size=1, bucket="b", offset=0, layout=layout)
    def method_step(deferred):
        method = make_method("ecx", alpha=alpha)
        method.deferred = deferred
        state = method.init_state(layout)

        def step():
            method.encode(u, state, ctx)
            method.commit(state)
        return step
    s2p = best_time(method_step(False), rep)
    t.add("ecx method encode, two-pass (rotates buffers)", s2p, 12 * n,
          f"{bound / s2p:.2f} of bound")
    s = best_time(method_step(True), rep)
    t.add("ecx method encode, one pass (as the engine runs it)", s, 12 * n,
          f"{bound / s:.2f} of bound; {s2p / s:.2f}x the two-pass encode's speed")
    w1, w2 = d1.clone(), d2.clone()
    s_old = best_time(lambda: unfused_ecx(u, w1, w2, layout, alpha), max(1, rep // 3))
    t.add("unfused ecx encode (before)", s_old, 12 * n, f"fused is {s_old / s:.1f}x faster")
    plain = make_method("ecx", alpha=alpha)
    plain.fused = False
    pstate = plain.init_state(layout)
    s_ref = best_time(lambda: plain.encode(u, pstate, ctx), 1, budget=0.0)
    t.add("unfused ecx reference (same bits as fused)", s_ref, 12 * n,
          f"fused is {s_ref / s:.1f}x faster")


def unfused_momentum(g, m, backup, beta, norm):
    """What signum (norm False) / ssdm (norm True) cost per bucket before their fused kernels:
    the engine's NaN/Inf pass and backup copy of the momentum, the in-place update, then
    (ssdm) the max-norm, the zero count and the pack."""
    from hvd_signsgd.codecs import count_zeros
    kernels.all_finite(g)
    backup.copy_(m)
    m.mul_(beta).add_(g, alpha=1.0 - beta)
    if not norm:
        return count_zeros(m), kernels.pack_signs(m)
    lo, hi = torch.aminmax(m)
    absmax = max(-float(lo), float(hi))
    return count_zeros(m), kernels.pack_stochastic_signs(m, absmax, 1, 0)


def fused_momentum(t, n, rep, bw, rng):
    """momentum_sign (streams: g, m read, m_out written, bits and zero plane written) and
    momentum_absmax (g, m read, m_out written); each against the per-bucket work it replaces:
    signum's whole encode, and ssdm's encode up to the stochastic pack (both with the pack)."""
    from hvd_signsgd.codecs import Layout
    from hvd_signsgd.methods import StepContext, make_method
    g = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
    m = torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.1)
    m_out, backup = torch.empty(n), torch.empty(n)
    layout = Layout.for_sizes([n])
    for name, fn, streams in (("momentum_sign", kernels.momentum_sign, 12 * n + 2 * (n / 8)),
                              ("momentum_absmax", kernels.momentum_absmax, 12 * n)):
        bound = streams / (4 * n / bw)
        s = best_time(lambda fn=fn: fn(g, m, m_out, 0.9), rep)
        t.add(f"native {name} kernel", s, 8 * n,
              f"bound {bound * 1e3:.2f} ms: {bound / s:.2f} of bound")
    for name in ("signum", "ssdm"):
        method = make_method(name)
        state = method.init_state(layout)
        state["momentum"].copy_(m)

        def encode(method=method, state=state):
            ctx = StepContext(step=0, rank=0, size=1, bucket="b", offset=0, layout=layout)
            method.prepare(g, state, ctx)
            if method.model_scope:
                ctx.model_norm = method.combine_norms([method.norm_part(g, state, ctx)])
            method.encode(g, state, ctx)
            method.commit(state)
        s = best_time(encode, rep)
        t.add(f"{name} encode, fused (kernel + payload)", s, 8 * n, "")
        work = m.clone()
        s_old = best_time(lambda work=work, norm=name == "ssdm":
                          unfused_momentum(g, work, backup, 0.9, norm), max(1, rep // 3))
        t.add(f"{name} encode, unfused (before)", s_old, 8 * n,
              f"fused is {s_old / s:.1f}x faster")


def fused_scans(t, n, rep, bw, rng):
    """sign_scan (signsgd's encode; x read, bits and zero plane written) against the three
    passes it replaces, and add_finite (topk / threshold's compensation; g, e read, p
    written) against the backup copy, NaN/Inf sum and in-place add it replaces."""
    x = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
    e = torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.1)
    out, backup = torch.empty(n), torch.empty(n)
    bound = (4 * n + 2 * (n / 8)) / (4 * n / bw)
    s = best_time(lambda: kernels.sign_scan(x), rep)
    t.add("native sign_scan kernel", s, 4 * n,
          f"bound {bound * 1e3:.2f} ms: {bound / s:.2f} of bound")
    s_old = best_time(lambda: (kernels.all_finite(x), kernels.count_zeros(x),
                               kernels.pack_signs(x)), max(1, rep // 3))
    t.add("signsgd encode passes, unfused (before)", s_old, 4 * n,
          f"sign_scan is {s_old / s:.1f}x faster")
    bound = 12 * n / (4 * n / bw)
    s = best_time(lambda: kernels.add_finite(x, e, out), rep)
    t.add("native add_finite kernel", s, 8 * n,
          f"bound {bound * 1e3:.2f} ms: {bound / s:.2f} of bound")

    def unfused():        # the add written out of place here too, so that e stays the same
        backup.copy_(e)
        kernels.all_finite(x)
        torch.add(e, x, out=out)
    s_old = best_time(unfused, max(1, rep // 3))
    t.add("topk compensation, unfused (copy, NaN sum, add)", s_old, 8 * n,
          f"add_finite is {s_old / s:.1f}x faster")
    fused_topk(t, n, rep, bw, x.clone(), e.clone(), out)


def fused_topk(t, n, rep, bw, g, e, out, ratio=0.01):
    """topk_take_sum (Top-k's encode: p = g + e formed in the selection, 1% per tensor of
    2^20) against add_finite then topk_take; streams: g, e read, p written (the pairs, 2% of
    n in 8-byte pairs, and the candidates are left out of the bound). g and e as the engine
    holds them, torch allocations (64-byte aligned): from numpy's 16-byte aligned arrays,
    half the fused pass's 32-byte loads straddle two cache lines, and it is no faster than
    the two calls."""
    from hvd_signsgd.codecs import Layout
    from hvd_signsgd.methods.sparse import TopK
    seg = min(n, 1 << 20)
    layout = Layout.for_sizes([seg] * (n // seg))
    segs = TopK(ratio).segments(layout)
    total = int(torch.minimum(segs[:, 1], segs[:, 2]).sum())
    idx, vals = torch.empty(total, dtype=torch.int32), torch.empty(total)
    bound = 12 * n / (4 * n / bw)
    s = best_time(lambda: kernels.topk_take_sum(g, e, out, segs, idx, vals), rep)
    t.add(f"native topk_take_sum, {ratio:.0%} of 2^{seg.bit_length() - 1}", s, 8 * n,
          f"bound {bound * 1e3:.2f} ms: {bound / s:.2f} of bound")
    s_old = best_time(lambda: (kernels.add_finite(g, e, out),
                               kernels.topk_take(out, segs, idx, vals)), rep)
    t.add("add_finite then topk_take (before)", s_old, 8 * n,
          f"topk_take_sum is {s_old / s:.2f}x faster")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log2n", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--ranks", type=int, nargs="*", default=[2, 4, 8, 16, 64])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--only", choices=["all", "fused"], default="all",
                        help="fused: the read bandwidth and the fused encodes (ef_signsgd, "
                             "ecx, signum, ssdm, signsgd, topk) alone")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(1)
    n, rep = 1 << args.log2n, args.repeat
    native = kernels._native
    isa = native.isa() if native is not None else "-"
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"numpy {np.__version__}; backend {kernels.backend()} ({isa}); n = 2^{args.log2n}; "
          f"1 thread; {args.clock} clock\n")
    t = Table(n)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(n, dtype=np.float32)
    x = torch.from_numpy(x_np)

    # -- reference points
    bw = t.add("numpy sum (read bandwidth), f32", best_time(x_np.sum, rep), 4 * n)
    fused_encodes(t, n, rep, bw, rng)
    fused_ecx(t, n, rep, bw, rng)
    fused_momentum(t, n, rep, bw, rng)
    fused_scans(t, n, rep, bw, rng)
    if args.only == "fused":
        t.print()
        print(FUSED_NOTE)
        return
    packbits = t.add("numpy.packbits(x < 0), f32",
                     best_time(lambda: np.packbits(x_np < 0, bitorder="little"), rep), 4 * n)

    # -- pack
    torch_pack = t.add("torch-op pack_signs, f32", best_time(lambda: _torch.pack_signs(x), rep),
                       4 * n)
    s = best_time(lambda: kernels.pack_signs(x), rep)
    t.add(f"native pack_signs, f32 ({isa})", s, 4 * n,
          f"{bw / s:.2f}x read BW, {packbits / s:.1f}x packbits, {torch_pack / s:.0f}x torch-op")
    for dtype in (torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        s = best_time(lambda xd=xd: kernels.pack_signs(xd), rep)
        t.add(f"native pack_signs, {str(dtype)[6:]}", s, 2 * n,
              f"{2 * n / s / (4 * n / bw):.2f}x read BW")
    if native is not None and "portable" in native.available_isas() and isa != "portable":
        previous = native.set_isa("portable")
        s = best_time(lambda: kernels.pack_signs(x), rep)
        native.set_isa(previous)
        t.add("native pack_signs, f32 (portable C)", s, 4 * n)

    # -- stochastic pack
    norm = float(x.norm())
    torch_st = t.add("torch-op pack_stochastic_signs, f32",
                     best_time(lambda: _torch.pack_stochastic_signs(x, norm, 1, 0), rep), 4 * n)
    s = best_time(lambda: kernels.pack_stochastic_signs(x, norm, 1), rep)
    t.add(f"native pack_stochastic_signs, f32 ({isa})", s, 4 * n, f"{torch_st / s:.0f}x torch-op")

    # -- unpack
    bits = kernels.pack_signs(x)
    out = torch.empty(n)
    torch_un = t.add("torch-op unpack_signs -> f32",
                     best_time(lambda: _torch.unpack_signs(bits, n, 1.0, out), rep), n / 8)
    s = best_time(lambda: kernels.unpack_signs(bits, n, 1.0, out=out), rep)
    t.add(f"native unpack_signs -> f32 ({isa})", s, n / 8,
          f"{torch_un / s:.0f}x torch-op; writes {4 * n / s / 1e9:.1f} GB/s")

    # -- vote
    for ranks in args.ranks:
        rows = torch.from_numpy(rng.integers(0, 256, (ranks, n // 8), dtype=np.uint8))
        acc = torch.empty(n)

        def unpack_then_sum(rows=rows, acc=acc, ranks=ranks):
            acc.zero_()
            for m in range(ranks):
                acc += kernels.unpack_signs(rows[m], n)  # n_ranks float vectors
            return acc.sign()

        base = t.add(f"torch unpack-to-float + sum + sign, R={ranks}",
                     best_time(unpack_then_sum, rep), ranks * n / 8)
        s = best_time(lambda rows=rows: kernels.vote(rows, n, "majority", out=out), rep)
        t.add(f"native vote majority, R={ranks}", s, ranks * n / 8, f"{base / s:.0f}x unpack+sum")
        weights = [1.0 / (m + 1) for m in range(ranks)]
        s = best_time(lambda rows=rows, w=weights: kernels.vote(rows, n, "sum", w, out=out), rep)
        t.add(f"native vote weighted sum, R={ranks}", s, ranks * n / 8,
              f"{base / s:.0f}x unpack+sum")
    t.print()
    print(FUSED_NOTE)
    print("\nG elem/s: elements of one vector per second; read GB/s: input bytes per second "
          "(packed bytes of all ranks for unpack/vote).")


if __name__ == "__main__":
    main()
