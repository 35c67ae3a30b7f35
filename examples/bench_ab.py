"""Two builds of the native extension against each other, in one process (not a test).

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace)
    .venv/bin/python examples/bench_ab.py --baseline /tmp/base/hvd_signsgd/_native*.so

Both builds are loaded side by side and take turns on the same data, so a machine whose speed
drifts between two runs (a shared one does) weighs on both alike. The data are one ResNet-50
step (the shapes of examples/bench_comm.py in buckets of --bucket-cap-mb, registration order,
as the wrapper groups them): 25.6M elements in 5 buckets of up to 25 MB, each kernel called
once per bucket, so the buckets do not stay in the cache between calls, as in training. Every
kernel the two builds share is timed on identical inputs, the outputs are checked to be equal,
and the table gives the best of --repeat steps (CPU time of this thread) and the ratio.

Kernels: the sign encodes (sign_scan, momentum_sign, momentum_absmax, pack_stochastic_signs,
ef_sign, and ef_signsgd's encode as each build runs it: ef_sign_deferred where it has it), the
decodes of --ranks ranks (vote majority and mean, scaled_vote, sparse_sum of
Top-k 1% pairs with the mean), and Top-k's compensation and selection (add_finite,
topk_take). A build without some kernel skips it; sparse_sum without a divisor argument is
followed by torch's div_ (what the method did before).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_comm import MODELS  # noqa: E402  (the shapes; importing it does not start Horovod)
from bench_topk import buckets_of  # noqa: E402

HERE = Path(__file__).resolve().parents[1] / "hvd_signsgd"


def load(path: str, package: str):
    """The extension module at path, as package._native: a name of its own, so that Python
    does not hand back the build `import hvd_signsgd` already loaded."""
    name = f"{package}._native"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def make_buckets(cap_mb: float, ranks: int, seed: int) -> list[dict]:
    """Per bucket: its layout, a gradient and a memory (N(0, 1) scaled per 1024 elements:
    magnitudes not identically distributed), the gathered sign rows of `ranks` ranks, the
    segments as the fused kernels take them, and each rank's Top-k 1% pairs."""
    rng = np.random.default_rng(seed)
    sizes = [math.prod(shape) for _, shape in MODELS["resnet50"]()]
    out = []
    for lay in buckets_of(sizes, cap_mb):
        n = lay.numel

        def vec(n=n):
            scale = np.repeat(rng.random(n // 1024 + 1).astype(np.float32), 1024)[:n]
            return torch.from_numpy(rng.standard_normal(n).astype(np.float32) * scale)

        segs = list(lay.segments())
        k_per = [max(1, math.ceil(0.01 * s)) for _, s in segs]
        pairs = []
        for _ in range(ranks):
            idx = np.concatenate([o + np.sort(rng.choice(s, k, replace=False))
                                  for (o, s), k in zip(segs, k_per)]).astype(np.int32)
            pairs.append((idx, rng.standard_normal(idx.size).astype(np.float32)))
        out.append({
            "n": n, "g": vec(), "e": vec(),
            "rows": rng.integers(0, 256, (ranks, (n + 7) // 8), dtype=np.uint8),
            "segs": np.array(segs, dtype=np.int64).reshape(-1, 2),
            "segs3": np.array([(o, s, k) for (o, s), k in zip(segs, k_per)],
                              dtype=np.int64).reshape(-1, 3),
            "weights": rng.random((len(segs), ranks)).astype(np.float32),
            "pairs": pairs, "k": sum(k_per),
        })
    return out


def kernels_of(mod, ranks: int) -> dict:
    """name -> fn(bucket) returning the outputs to compare, for the kernels mod has. Float
    outputs go into one buffer per bucket, reused from step to step as the wrapper reuses its
    buckets and spare memories; the small bit planes are allocated per call, as the methods
    allocate them."""
    buffers = {}

    def planes(b):
        nb = (b["n"] + 7) // 8
        return np.empty(nb, np.uint8), np.empty(nb, np.uint8)

    def writes(fn):
        """fn(b, out) -> result, out the bucket's float32 buffer (this build's own, compared
        with the other build's once both have run); returns (out, result)."""
        def run(b):
            if id(b) not in buffers:
                buffers[id(b)] = np.empty(b["n"], np.float32)
            out = buffers[id(b)]
            return out, fn(b, out)
        return run

    def sign_scan(b):
        bits, plane = planes(b)
        return mod.sign_scan(b["g"].numpy(), bits, plane), bits, plane

    def momentum_sign(b, out):
        bits, plane = planes(b)
        return mod.momentum_sign(b["g"].numpy(), b["e"].numpy(), out, 0.9, bits, plane), bits

    def ef_sign(b, out):
        bits, plane = planes(b)
        scales = np.empty(len(b["segs"]), np.float32)
        zeros = np.empty(len(b["segs"]) + 1, np.int64)
        ok = mod.ef_sign(b["g"].numpy(), b["e"].numpy(), out, b["segs"], bits, plane, scales,
                         zeros)
        return ok, bits, scales, zeros

    def ef_encode(b):
        """ef_signsgd's encode as this build runs it: ef_sign_deferred where the build has it
        (scales 0: the memory e itself, so p = g + e as for ef_sign), else ef_sign. The new
        memory differs in form (p, or the residual) and is not compared; the payload is."""
        key = ("ef", id(b))
        if key not in buffers:
            buffers[key] = np.empty(b["n"], np.float32)
        bits, plane = planes(b)
        scales = np.empty(len(b["segs"]), np.float32)
        zeros = np.empty(len(b["segs"]) + 1, np.int64)
        args = (b["g"].numpy(), b["e"].numpy(), buffers[key], b["segs"], bits, plane, scales,
                zeros)
        if hasattr(mod, "ef_sign_deferred"):
            ok = mod.ef_sign_deferred(*args, np.zeros(len(b["segs"]), np.float32))
        else:
            ok = mod.ef_sign(*args)
        return ok, bits, plane, scales, zeros

    def sparse_mean(b, out):
        if "divisor" in (mod.sparse_sum.__doc__ or ""):
            return mod.sparse_sum(b["pairs"], b["n"], out, float(ranks))
        result = mod.sparse_sum(b["pairs"], b["n"], out)
        torch.from_numpy(out).div_(ranks)
        return result

    def vote(mode):
        return writes(lambda b, out: mod.vote(b["rows"], b["n"], out, mode=mode))

    ks = {
        "sign_scan (signsgd)": sign_scan if hasattr(mod, "sign_scan") else None,
        "momentum_sign (signum)": writes(momentum_sign),
        "momentum_absmax (ssdm)": writes(
            lambda b, out: mod.momentum_absmax(b["g"].numpy(), b["e"].numpy(), out, 0.9)),
        "pack_stochastic_signs (ssdm)": lambda b: mod.pack_stochastic_signs(
            b["g"].numpy(), 3.0, 7, 0, planes(b)[0]),
        "ef_sign (ecx, plain-dict states)": writes(ef_sign),
        "ef_signsgd encode (one pass if built)": ef_encode,
        f"vote majority, {ranks} ranks": vote("majority"),
        f"vote mean, {ranks} ranks (ssdm)":
            vote("mean") if "'mean'" in (mod.vote.__doc__ or "") else None,
        f"scaled_vote, {ranks} ranks (ef_signsgd)": writes(
            lambda b, out: mod.scaled_vote(b["rows"], b["segs"], b["weights"], out))
            if hasattr(mod, "scaled_vote") else None,
        "add_finite (topk)": writes(
            lambda b, out: mod.add_finite(b["g"].numpy(), b["e"].numpy(), out))
            if hasattr(mod, "add_finite") else None,
        f"sparse_sum + mean, {ranks} ranks 1% (topk)": writes(sparse_mean),
    }
    return {k: v for k, v in ks.items() if v is not None}


def topk_step(mod, buckets, state):
    """topk_take on fresh copies of p (the copy is not timed); seconds of CPU time."""
    total = 0.0
    for i, b in enumerate(buckets):
        p = state.setdefault(i, np.empty(b["n"], np.float32))
        np.copyto(p, b["g"].numpy())
        idx, vals = np.empty(b["k"], np.int32), np.empty(b["k"], np.float32)
        t0 = time.thread_time()
        mod.topk_take(p, b["segs3"], idx, vals)
        total += time.thread_time() - t0
        state[("r", i)] = (idx, p)
    return total


def same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="path of the other build's _native*.so")
    ap.add_argument("--current", default=None, help="default: this checkout's build")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--only", default="", help="comma-separated substrings of kernel names")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    current = args.current or str(next(HERE / f"_native{suffix}"
                                       for suffix in importlib.machinery.EXTENSION_SUFFIXES
                                       if (HERE / f"_native{suffix}").exists()))
    builds = {v: load(p, f"hsg_ab_{v}") for v, p in (("baseline", args.baseline),
                                                        ("current", current))}
    assert builds["baseline"] is not builds["current"]
    buckets = make_buckets(args.bucket_cap_mb, args.ranks, seed=0)
    print(f"baseline {args.baseline}\ncurrent  {current}\nISA {builds['current'].isa()}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{sum(b['n'] for b in buckets)} elements in {len(buckets)} buckets; "
          f"ms per step, best of {args.repeat}, CPU time")
    print(f"{'kernel':<40} {'baseline':>9} {'current':>9} {'speed-up':>9}")
    tables = {v: kernels_of(m, args.ranks) for v, m in builds.items()}
    wanted = [s for s in args.only.split(",") if s]
    for name in tables["current"]:
        if name not in tables["baseline"] or (wanted and not any(w in name for w in wanted)):
            continue
        best, results = {}, {}
        for _ in range(args.repeat):
            for v in builds:
                t0 = time.thread_time()
                results[v] = [tables[v][name](b) for b in buckets]
                best[v] = min(best.get(v, math.inf), time.thread_time() - t0)
        ok = same(results["baseline"], results["current"])
        _row(name, best, ok)
    if not wanted or any(w in "topk_take" for w in wanted):
        best, states = {}, {v: {} for v in builds}
        for _ in range(args.repeat):
            for v, m in builds.items():
                best[v] = min(best.get(v, math.inf), topk_step(m, buckets, states[v]))
        ok = all(same(states["baseline"][("r", i)], states["current"][("r", i)])
                 for i in range(len(buckets)))
        _row("topk_take 1% (topk)", best, ok)


def _row(name, best, ok):
    b, c = 1e3 * best["baseline"], 1e3 * best["current"]
    print(f"{name:<40} {b:>9.1f} {c:>9.1f} {b / c:>8.2f}x" + ("" if ok else "  OUTPUTS DIFFER"),
          flush=True)


if __name__ == "__main__":
    main()
