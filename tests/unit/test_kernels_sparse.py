"""Property tests of the sparse kernels (kernels.topk_take, threshold_take, threshold_count,
sparse_sum): native (every ISA) and torch fallback give identical bits, the selected set is the
one of a stable descending sort of |p|, the fused error-feedback update conserves, the decode is
today's zeros + index_add_ sum bit for bit, and topk / threshold payloads are byte for byte
those of the previous torch implementation (topk_indices + Sparse.encode).

Also run against an ASan/UBSan build of the extension by test_kernels_asan.py.
"""
import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hvd_signsgd import kernels as K
from hvd_signsgd import make_method, wire
from hvd_signsgd.codecs import FP16_MAX, Layout, Sparse
from hvd_signsgd.kernels import _torch as T
from hvd_signsgd.methods import StepContext
from hvd_signsgd.methods.sparse import topk_indices

NATIVE = K._native
assert NATIVE is not None, f"native extension missing: {K._native_unavailable}"
BACKENDS = [f"native-{name}" for name in NATIVE.available_isas()] + ["torch"]
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Values that make ties, signed zeros, subnormals and float16 clamping common.
POOL = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 0.5, -0.5, 1.0, -1.0, 2.5, -2.5,
                 3.0, 65504.0, -65504.0, 65520.0, 7e4, -7e4, 1e-8, 6e-8], dtype=np.float32)


@contextlib.contextmanager
def backend(name):
    """The public kernels on one backend: a native ISA, or the torch fallback."""
    saved = K._USE_NATIVE
    previous = NATIVE.set_isa(name.split("-", 1)[1] if name != "torch" else "auto")
    K._USE_NATIVE = name != "torch"
    try:
        yield
    finally:
        K._USE_NATIVE = saved
        NATIVE.set_isa(previous)


def bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16}.get(t.dtype, t.dtype))


def values(n, seed, kind):
    """float32 test vector: "gauss" (scaled normals), "ties" (from POOL), "mixed" (both),
    "narrow" (one top-11-bit bin: [1, 1.1)), "equal" (one value)."""
    rng = np.random.default_rng(seed)
    if kind == "ties":
        v = rng.choice(POOL, n)
    elif kind == "narrow":
        v = 1.0 + rng.random(n) * 0.1
    elif kind == "equal":
        v = np.full(n, -2.0)
    else:
        v = rng.standard_normal(n) * np.exp(rng.standard_normal(n))
        if kind == "mixed":
            where = rng.random(n) < 0.5
            v[where] = rng.choice(POOL, int(where.sum()))
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))


def random_segments(n, seed):
    """Ascending, non-overlapping (offset, size, k) with gaps; k in {0, 1, size - 1, size,
    size + 3, random}."""
    rng = np.random.default_rng(seed)
    segs, pos = [], int(rng.integers(0, 3))
    while pos < n:
        size = int(rng.integers(0, min(n - pos, 700) + 1))
        k = int(rng.choice([0, 1, max(size - 1, 0), size, size + 3, rng.integers(0, size + 1)]))
        segs.append((pos, size, k))
        pos += size + int(rng.integers(0, 9))
    return segs


def reference_positions(p, segs):
    """The documented set, independently: the first k of a stable descending sort of |p|."""
    out = []
    for o, s, k in segs:
        order = torch.sort(p[o:o + s].abs(), descending=True, stable=True).indices
        out.append(o + order[:min(k, s)].sort().values)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def run_topk(name, p, segs, vdtype):
    total = sum(min(k, s) for _, s, k in segs)
    q = p.clone()
    idx = torch.empty(total, dtype=torch.int32)
    vals = torch.empty(total, dtype=vdtype)
    with backend(name):
        K.topk_take(q, segs, idx, vals)
    return q, idx, vals


# ---- topk_take -------------------------------------------------------------------------------


@SETTINGS
@given(n=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(["gauss", "ties", "mixed", "narrow", "equal"]),
       fp16=st.booleans())
@example(n=200_003, seed=1, kind="gauss", fp16=False)
@example(n=100_001, seed=2, kind="ties", fp16=True)
@example(n=100_001, seed=3, kind="narrow", fp16=False)
def test_topk_take_backends_identical_and_the_documented_set(n, seed, kind, fp16):
    p = values(n, seed, kind)
    segs = random_segments(n, seed) if n < 100_000 else [(0, n // 2, n // 200),
                                                         (n // 2 + 5, n // 2 - 5, n // 3)]
    vdtype = torch.float16 if fp16 else torch.float32
    expected = reference_positions(p, segs)
    results = [run_topk(name, p, segs, vdtype) for name in BACKENDS]
    q, idx, vals = results[0]
    assert idx.tolist() == expected.tolist()
    for q2, idx2, vals2 in results[1:]:
        assert torch.equal(idx2, idx)
        assert torch.equal(bits(vals2), bits(vals))
        assert torch.equal(bits(q2), bits(q))
    # fused EF: q holds p - (value as sent) at the taken positions, p elsewhere
    sent = vals.to(torch.float32)
    if fp16:
        assert torch.equal(sent, p[expected].clamp(-FP16_MAX, FP16_MAX).half().float())
    else:
        assert torch.equal(bits(sent), bits(p[expected]))
    assert torch.equal(bits(q[expected]), bits(p[expected] - sent))
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[expected] = False
    assert torch.equal(bits(q[untouched]), bits(p[untouched]))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sizes=st.lists(st.integers(4096, 40_000), min_size=1, max_size=3),
       ratio=st.sampled_from([0.0005, 0.003, 0.01, 0.05, 0.3, 0.9]),
       seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["gauss", "ties", "mixed", "narrow"]))
def test_topk_take_large_segments(sizes, ratio, seed, kind):
    """Segments large enough for the sampled bound (native/sparse.c, step 1)."""
    p = values(sum(sizes) + 8 * len(sizes), seed, kind)
    segs, pos = [], 3
    for s in sizes:
        segs.append((pos, s, max(1, math.ceil(ratio * s))))
        pos += s + 5
    expected = reference_positions(p, segs)
    results = [run_topk(name, p, segs, torch.float32) for name in BACKENDS]
    assert results[0][1].tolist() == expected.tolist()
    for q, idx, vals in results[1:]:
        assert torch.equal(idx, results[0][1]) and torch.equal(bits(vals), bits(results[0][2]))
        assert torch.equal(bits(q), bits(results[0][0]))


def sample_positions(d, k):
    """The positions native/sparse.c's sample_bound reads (runs of 16 from sample_run)."""
    s = 64 * d // k
    s -= s % 16
    stride = d // (s // 16)
    r = torch.arange(s // 16)
    start = r * stride + ((T._mix32(r) * (stride - 15)) >> 32)
    return (start[:, None] + torch.arange(16)).reshape(-1)


def test_topk_take_exact_when_the_sample_misleads():
    """White box: large values exactly at the sample's positions (native/sparse.c
    sample_bound) make its bound too high (fewer than k candidates), and zeros on the whole
    sample make it too low (too many); both fall back to the histogram path and stay exact."""
    d, k = 100_000, 300
    sample = sample_positions(d, k)
    p = torch.rand(d, generator=torch.Generator().manual_seed(0))
    p[sample[:200]] = 10.0                       # 200 tens, all in the sample; k = 300
    sparse_p = torch.zeros(d)
    off = torch.ones(d, dtype=torch.bool)
    off[sample] = False
    sparse_p[torch.nonzero(off).reshape(-1)[::250]] = 1.0   # ~300 nonzeros off the sample
    assert not sparse_p[sample].any() and (p[sample] == 10.0).sum() == 200
    for vec in (p, sparse_p):
        expected = reference_positions(vec, [(0, d, k)])
        for name in BACKENDS:
            assert run_topk(name, vec, [(0, d, k)], torch.float32)[1].tolist() == \
                expected.tolist()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("d", [1, 2, 31, 32, 33, 4097, 70_001])
def test_topk_take_edge_counts_and_tie_rule(name, d):
    p = values(d, d, "ties")
    for k in sorted({0, 1, d - 1, d, d + 5}):
        _, idx, _ = run_topk(name, p, [(0, d, k)], torch.float32)
        assert idx.tolist() == topk_indices(p.abs(), k).tolist(), k
    ones = torch.ones(d)                      # all tied: the lowest positions win
    _, idx, _ = run_topk(name, ones, [(0, d, d // 2)], torch.float32)
    assert idx.tolist() == list(range(d // 2))
    zeros = torch.zeros(d)                    # -0 and +0 are the same magnitude
    zeros[::2] = -0.0
    _, idx, _ = run_topk(name, zeros, [(0, d, 1)], torch.float32)
    assert idx.tolist() == [0]


@pytest.mark.parametrize("name", BACKENDS)
def test_topk_take_nan_and_inf_rank_above_numbers(name):
    """Not reachable from the methods (checked before); defined and in bounds anyway."""
    p = torch.tensor([1.0, math.nan, -math.inf, 5.0, -math.nan, math.inf, 3.0, -0.0])
    q, idx, vals = run_topk(name, p, [(0, 8, 5)], torch.float32)
    assert idx.tolist() == [1, 2, 3, 4, 5]
    assert torch.isnan(vals[[0, 3]]).all() and vals[[1, 2, 4]].tolist() == [-math.inf, 5, math.inf]
    assert q[[0, 6, 7]].tolist() == [1.0, 3.0, 0.0]


def test_fp16_values_clamp_and_keep_the_residual():
    p = torch.tensor([7e4, -1e6, 1.0 + 2**-12, 1e-9, 0.0])
    for name in BACKENDS:
        q, idx, vals = run_topk(name, p, [(0, 5, 5)], torch.float16)
        assert vals.tolist() == [65504.0, -65504.0, 1.0, 0.0, 0.0]
        assert q.tolist() == [7e4 - 65504.0, -1e6 + 65504.0, 2**-12, torch.tensor(1e-9).item(),
                              0.0]


# ---- threshold -------------------------------------------------------------------------------


@SETTINGS
@given(n=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(["gauss", "ties", "mixed"]), fp16=st.booleans(),
       lam=st.sampled_from([0.0, 1e-45, 1e-40, 0.5, 1.0, 1.00000003, 2.5, 65504.0, 1e39]))
def test_threshold_backends_identical_and_the_torch_comparison(n, seed, kind, fp16, lam):
    p = values(n, seed, kind)
    expected = (p.abs() >= lam).nonzero().squeeze(1)     # torch compares in float32
    vdtype = torch.float16 if fp16 else torch.float32
    results = []
    for name in BACKENDS:
        with backend(name):
            count = K.threshold_count(p, lam)
            assert count == expected.numel()
            q = p.clone()
            idx = torch.empty(count, dtype=torch.int32)
            vals = torch.empty(count, dtype=vdtype)
            K.threshold_take(q, lam, idx, vals)
            results.append((q, idx, vals))
    q, idx, vals = results[0]
    assert idx.tolist() == expected.tolist()
    for q2, idx2, vals2 in results[1:]:
        assert torch.equal(idx2, idx) and torch.equal(bits(vals2), bits(vals))
        assert torch.equal(bits(q2), bits(q))


@pytest.mark.parametrize("name", BACKENDS)
def test_threshold_take_with_the_wrong_count_raises_and_leaves_p(name):
    p = torch.tensor([3.0, 0.1, -2.0, 0.0])
    q = p.clone()
    with backend(name), pytest.raises(ValueError, match="reach the threshold"):
        K.threshold_take(q, 1.0, torch.empty(1, dtype=torch.int32), torch.empty(1))
    assert torch.equal(q, p)


# ---- sparse_sum (decode) ---------------------------------------------------------------------


def legacy_sum(parts, n):
    """The decode before the native kernel: zeros, then index_add_ / add_ part by part."""
    out = torch.zeros(n)
    for idx, vals in parts:
        if idx is None:
            out.add_(vals)
        elif idx.numel():
            out.index_add_(0, idx, vals.to(torch.float32))
    return out


@SETTINGS
@given(n=st.integers(1, 3000), ranks=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
       fp16=st.booleans())
def test_sparse_sum_is_the_legacy_sum_bit_for_bit(n, ranks, seed, fp16):
    rng = np.random.default_rng(seed)
    parts = []
    for r in range(ranks):
        if rng.random() < 0.2:
            parts.append((None, values(n, seed + r, "mixed")))
            continue
        nnz = int(rng.integers(0, n + 1))
        idx = torch.from_numpy(np.sort(rng.choice(n, nnz, replace=False)).astype(np.int32))
        parts.append((idx, values(nnz, seed + r, "mixed").to(torch.float16 if fp16
                                                                else torch.float32)))
    expected = legacy_sum(parts, n)
    for name in BACKENDS:
        with backend(name):
            got = K.sparse_sum(parts, n, out=torch.full((n,), 7.0))
        assert torch.equal(bits(got), bits(expected)), name


@SETTINGS
@given(n=st.integers(1, 5000), ranks=st.sampled_from([1, 2, 3, 4, 6, 33]),
       seed=st.integers(0, 2**32 - 1), fp16=st.booleans(), sparse_only=st.booleans(),
       ascending=st.booleans(),
       divisor=st.sampled_from([1, 2, 3, 4, 5, 7.5, 0.25, 2.0**-126, 2.0**-149, 2.0**126,
                                2.0**127]))
def test_sparse_sum_with_a_divisor_is_the_legacy_mean_bit_for_bit(n, ranks, seed, fp16,
                                                                   sparse_only, ascending,
                                                                   divisor):
    """The mean that TopK sends to the optimizer: sum, then div_ over the whole vector. Sparse
    parts with ascending indices (overlapping across parts) take the native block-by-block
    sum (native/sparse.c sg_blocked_sum); unsorted indices or a dense part the scatter-adds
    over the whole vector. A power of two from 2^-126 to 2^126 is a multiply by its
    reciprocal natively (sg_divide); the others, and 2^-149 and 2^127 (reciprocal not a
    normal float), divide."""
    rng = np.random.default_rng(seed)
    parts = []
    for r in range(ranks):
        if not sparse_only and rng.random() < 0.2:
            parts.append((None, values(n, seed + r, "mixed")))
            continue
        most = max(1, n // (4 * ranks))
        nnz = int(rng.integers(0, most + 1))
        idx = rng.choice(min(n, 3 * most + 1), min(nnz, n), replace=False).astype(np.int32)
        idx = torch.from_numpy(np.sort(idx) if ascending else idx)
        nnz = idx.numel()
        parts.append((idx, values(nnz, seed + r, "mixed").to(torch.float16 if fp16
                                                                else torch.float32)))
    expected = legacy_sum(parts, n).div_(divisor)
    for name in BACKENDS:
        with backend(name):
            got = K.sparse_sum(parts, n, out=torch.full((n,), 7.0), divisor=divisor)
        assert torch.equal(bits(got), bits(expected)), name


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("divisor", [1, 3, 4, 7.5, 0.125])
def test_sparse_sum_across_block_edges(fp16, divisor):
    """Long vectors: the blocked sum's cursors cross many 16384-element blocks, with pairs
    on both sides of every edge and one part that ends early and one that starts late."""
    block, n = 16384, 3 * 16384 + 5
    edges = [e + d for e in range(block, n, block) for d in (-1, 0, 1)]
    rng = np.random.default_rng(3)
    dtype = torch.float16 if fp16 else torch.float32
    parts = []
    for r, idx in enumerate([edges + [0, n - 1],
                             sorted(set(edges) | set(rng.choice(n, 500, replace=False))),
                             [5, 17, block - 1],
                             [n - 3, n - 2, n - 1]]):
        idx = torch.tensor(sorted(set(int(i) for i in idx)), dtype=torch.int32)
        parts.append((idx, values(idx.numel(), 40 + r, "mixed").to(dtype)))
    expected = legacy_sum(parts, n).div_(divisor)
    for name in BACKENDS:
        with backend(name):
            got = K.sparse_sum(parts, n, out=torch.full((n,), 7.0), divisor=divisor)
        assert torch.equal(bits(got), bits(expected)), name


@pytest.mark.parametrize("divisor", [0, -2, math.inf, math.nan, 1e39, 1e-46, 10**400])
def test_sparse_sum_rejects_a_bad_divisor(divisor):
    with pytest.raises(ValueError, match="divisor"):
        K.sparse_sum([(None, torch.ones(3))], 3, divisor=divisor)


@pytest.mark.parametrize("divisor", ["4", None, torch.tensor(4.0)])
def test_sparse_sum_refuses_a_divisor_that_is_not_a_number(divisor):
    with pytest.raises(TypeError, match="divisor"):
        K.sparse_sum([(None, torch.ones(3))], 3, divisor=divisor)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 10, 2**31 - 1])
def test_sparse_sum_rejects_out_of_range_before_writing(name, bad):
    parts = [(torch.tensor([1, 2], dtype=torch.int32), torch.ones(2)),
             (torch.tensor([0, bad], dtype=torch.int32), torch.ones(2))]
    out = torch.full((10,), 7.0)
    with backend(name), pytest.raises(K.SparseIndexError) as info:
        K.sparse_sum(parts, 10, out=out)
    assert info.value.part == 1
    assert torch.equal(out, torch.full((10,), 7.0))


@pytest.mark.parametrize("name", BACKENDS)
def test_codec_aggregate_raises_payload_error_naming_the_rank(name):
    codec = Sparse()
    good = codec.encode(torch.tensor([1, 3]), torch.tensor([1.0, 2.0]), 8)
    body = codec.encode(torch.tensor([1, 3]), torch.tensor([1.0, 2.0]), 8)
    body[wire.HEADER_NBYTES + 4:wire.HEADER_NBYTES + 8] = torch.tensor([8], dtype=torch.int32
                                                                        ).view(torch.uint8)
    payloads = wire.split(torch.cat([good, body]), 2, bucket="b", codec="sparse32", n=8)
    with backend(name), pytest.raises(wire.PayloadError, match="rank 1 for bucket b"):
        codec.aggregate(payloads, 8, "b")


# ---- argument checks (both backends) ---------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_arguments_raise(name):
    p = torch.randn(20)
    i2, v2 = torch.empty(2, dtype=torch.int32), torch.empty(2)
    cases = [
        (TypeError, lambda: K.topk_take(p.double(), [(0, 20, 2)], i2, v2)),
        (TypeError, lambda: K.topk_take(p, [(0, 20, 2)], i2.long(), v2)),
        (TypeError, lambda: K.topk_take(p, [(0, 20, 2)], i2, v2.bfloat16())),
        (ValueError, lambda: K.topk_take(p, [(0, 20, 3)], i2, v2)),          # wrong count
        (ValueError, lambda: K.topk_take(p, [(0, 10, 1), (5, 10, 1)], i2, v2)),  # overlap
        (ValueError, lambda: K.topk_take(p, [(15, 10, 2)], i2, v2)),         # past the end
        (ValueError, lambda: K.topk_take(p, [(0, 20, -1)], i2, v2)),
        (ValueError, lambda: K.topk_take(p, torch.tensor([[0, 20, 3]]), i2, v2)),
        (ValueError, lambda: K.topk_take(p, torch.tensor([[0, 10, 1], [5, 10, 1]]), i2, v2)),
        (ValueError, lambda: K.topk_take(p, torch.tensor([[15, 10, 2]]), i2, v2)),
        (ValueError, lambda: K.topk_take(p[::2], [(0, 10, 2)], i2, v2)),     # strided
        (ValueError, lambda: K.threshold_count(p, -1.0)),
        (ValueError, lambda: K.threshold_count(p, math.nan)),
        (ValueError, lambda: K.sparse_sum([(None, torch.ones(3))], 4)),
        (ValueError, lambda: K.sparse_sum([(i2, torch.ones(3))], 4)),
    ]
    with backend(name):
        for exc, fn in cases:
            with pytest.raises(exc):
                fn()


def misaligned(n):
    return np.frombuffer(bytearray(4 * n + 1), np.float32, n, 1)


@pytest.mark.parametrize("case", ["total", "int32 segments", "int64 idx", "vals in p",
                                  "misaligned p", "segments 2-wide"])
def test_native_binding_rechecks(case):
    """The extension's own checks (what the public face already rules out)."""
    p, i, v = np.zeros(20, np.float32), np.zeros(2, np.int32), np.zeros(2, np.float32)
    segs = np.array([[0, 20, 2]], np.int64)
    args = {"total": (p, np.zeros((1, 3), np.int64), i, v),
            "int32 segments": (p, segs.astype(np.int32), i, v),
            "int64 idx": (p, segs, i.astype(np.int64), v),
            "vals in p": (p, segs, i, p[:2]),
            "misaligned p": (misaligned(20), segs, i, v),
            "segments 2-wide": (p, np.array([0, 20], np.int64), i, v)}[case]
    with pytest.raises((TypeError, ValueError)):
        NATIVE.topk_take(*args)


# ---- the methods: payload bytes and memory as the previous implementation --------------------


def legacy_encode(method, p, layout):
    """topk / threshold encode as it was before the native kernels (p updated in place)."""
    codec = method.codec
    if method.name == "topk":
        a = p.abs()
        counts = method.counts(layout)
        if method.scope == "bucket":
            idx = topk_indices(a, counts[0])
        else:
            idx = torch.cat([o + topk_indices(a[o:o + s], k)
                             for (o, s), k in zip(layout.segments(), counts)])
    else:
        idx = (p.abs() >= method.lam_for(layout)).nonzero().squeeze(1)
        if idx.numel() > method.max_density * layout.real_numel:
            msg = codec.encode_dense(p)
            p.zero_()
            return msg
    vals = p[idx]
    q = codec.quantize(vals)
    msg = codec.encode(idx, q, layout.numel)
    p[idx] = vals - q
    return msg


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("method,options", [
    ("topk", {}), ("topk", {"ratio": 0.05, "values": "fp16"}),
    ("topk", {"k": 3, "scope": "bucket"}), ("topk", {"ratio": 0.3, "scope": "bucket"}),
    ("threshold", {"lam": 1.2}), ("threshold", {"lam": 0.9, "values": "fp16"}),
    ("threshold", {"lam": 0.05}),                                   # dense fallbacks
])
def test_payloads_and_memory_byte_for_byte_as_before(name, method, options):
    torch.manual_seed(0)
    m = make_method(method, **options)
    layout = Layout.for_sizes([37, 1, 130, 2000, 9])
    state = m.init_state(layout)
    legacy = torch.zeros(layout.numel)
    for step in range(6):
        g = torch.zeros(layout.numel)
        for o, s in layout.segments():
            g[o:o + s] = torch.randn(s) * (step + 1)
            g[o:o + s:5] = 0.5                        # ties
        ctx = StepContext(step=step, rank=0, size=1, bucket="b", offset=0, layout=layout)
        with backend(name):
            msg = m.encode(g, state, ctx)
        expected = legacy_encode(m, legacy.add_(g), layout)
        assert torch.equal(msg, expected), step
        assert torch.equal(bits(state["error"]), bits(legacy)), step


# ---- the fused compensation p = g + e (kernels.add_finite) and the fused methods -------------

ADD_KINDS = st.lists(st.sampled_from(["normal", "zeros", "subnormal", "cancel", "huge", "nan",
                                      "inf"]), max_size=3)


def add_inputs(n, kinds, seed):
    """a, b with signed zeros, subnormals, exact cancellation, overflowing sums, NaN / Inf."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(np.float32)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    some = lambda: rng.random(n) < 0.2  # noqa: E731
    if "zeros" in kinds:
        m = some()
        a[m], b[m] = rng.choice([0.0, -0.0], int(m.sum())), -0.0
    if "subnormal" in kinds:
        m = some()
        a[m], b[m] = 1e-40, -3e-41
    if "cancel" in kinds:
        m = some()
        b[m] = -a[m]
    if "huge" in kinds and n:                   # finite inputs, an overflowing sum
        j = int(rng.integers(0, n))
        a[j], b[j] = 3e38, 3e38
    for kind, value in (("nan", math.nan), ("inf", -math.inf)):
        if kind in kinds and n:
            (a if rng.random() < 0.5 else b)[int(rng.integers(0, n))] = value
    return torch.from_numpy(a), torch.from_numpy(b)


@SETTINGS
@given(n=st.one_of(st.sampled_from([0, 1, 7, 8, 15, 16, 17, 33, 4097]), st.integers(0, 5000)),
       kinds=ADD_KINDS, seed=st.integers(0, 2**32 - 1), shift=st.integers(0, 7))
@example(n=1 << 20, kinds=["nan"], seed=0, shift=0)          # the streamed stores, NaN late
def test_add_finite_every_backend_is_torch_add(n, kinds, seed, shift):
    """out = a + b bit for bit on every backend and alignment (32-byte aligned out takes the
    streaming stores); True exactly when every sum is finite."""
    a0, b0 = add_inputs(n, kinds, seed)
    want = a0 + b0
    finite = bool(torch.isfinite(want).all())
    base = torch.zeros(3 * (n + 8))
    a, b = base[shift:shift + n], base[n + 8 + shift:2 * n + 8 + shift]
    a.copy_(a0)
    b.copy_(b0)
    for name in BACKENDS:
        out = torch.full((n + 8,), 7.0)[shift:shift + n]
        with backend(name):
            ok = K.add_finite(a, b, out)
        assert ok is finite, name
        same = (bits(out) == bits(want)) | (out.isnan() & want.isnan())   # NaN payloads may differ
        assert bool(same.all()), name
        assert torch.equal(bits(a), bits(a0)) and torch.equal(bits(b), bits(b0)), name


@pytest.mark.parametrize("name", BACKENDS)
def test_add_finite_refuses_overlap_and_wrong_shapes(name):
    a, b = torch.randn(16), torch.randn(16)
    big = torch.zeros(40)
    with backend(name):
        for exc, fn in [(ValueError, lambda: K.add_finite(a, b, a)),
                        (ValueError, lambda: K.add_finite(big[:16], b, big[8:24])),
                        (ValueError, lambda: K.add_finite(a, b, torch.empty(15))),
                        (TypeError, lambda: K.add_finite(a.double(), b, torch.empty(16)))]:
            with pytest.raises(exc):
                fn()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sizes=st.lists(st.one_of(st.integers(0, 300), st.integers(4096, 40_000)), min_size=0,
                      max_size=4),
       gaps=st.lists(st.integers(0, 9), min_size=5, max_size=5),
       ratio=st.sampled_from([0.003, 0.01, 0.05, 0.3, 1.0]), kinds=ADD_KINDS,
       seed=st.integers(0, 2**32 - 1), shift=st.integers(0, 7), fp16=st.booleans())
@example(sizes=[70_001], gaps=[0, 0, 0, 0, 0], ratio=0.01, kinds=[], seed=0, shift=0,
         fp16=False)                                   # streamed from the first element
@example(sizes=[70_001, 5000], gaps=[3, 1, 2, 0, 0], ratio=0.01, kinds=[], seed=5, shift=3,
         fp16=False)                                   # a scalar head, positions shifted
@example(sizes=[70_001], gaps=[3, 1, 0, 0, 0], ratio=0.01, kinds=["nan"], seed=5, shift=3,
         fp16=False)
def test_topk_take_sum_is_add_finite_then_topk_take(sizes, gaps, ratio, kinds, seed, shift,
                                                    fp16):
    """topk_take_sum(g, e, p, ...) on every backend: p = g + e in full (gaps between and after
    the segments too) and the pairs of topk_take on that p, bit for bit; False exactly when
    some sum is NaN/Inf. Large segments take the fused sum-and-scan (native/sparse.c
    candidates); p at every alignment (the scalar head before the streamed stores)."""
    segs, pos = [], gaps[0]
    for s, gap in zip(sizes, gaps[1:]):
        segs.append((pos, s, max(1, math.ceil(ratio * s)) if s else 0))
        pos += s + gap
    n = pos + gaps[-1]
    a0, b0 = add_inputs(n, kinds, seed)
    want = a0 + b0
    finite = bool(torch.isfinite(want).all())
    vdtype = torch.float16 if fp16 else torch.float32
    q_want, idx_want, vals_want = run_topk("torch", want, segs, vdtype)
    total = idx_want.numel()
    for name in BACKENDS:
        p = torch.full((n + 8,), 7.0)[shift:shift + n]
        idx, vals = torch.empty(total, dtype=torch.int32), torch.empty(total, dtype=vdtype)
        with backend(name):
            ok = K.topk_take_sum(a0, b0, p, segs, idx, vals)
        assert ok is finite, name
        if finite:
            assert torch.equal(bits(p), bits(q_want)), name
            assert torch.equal(idx, idx_want) and torch.equal(bits(vals), bits(vals_want)), name


@pytest.mark.parametrize("shift", [0, 1, 7])
@pytest.mark.parametrize("case", ["too few", "too many", "head"])
def test_topk_take_sum_exact_when_the_sample_misleads(case, shift):
    """As test_topk_take_exact_when_the_sample_misleads, with p formed from g + e: the
    fallback paths run on the p the fused pass wrote. "too many": the sample sees only
    zeros, so every position is a candidate and the scan runs past its room (the AVX2
    body's share of it after a scalar head, which holds candidates too: p misaligned).
    "head": the sample is right and the scalar head's candidates are taken."""
    d, k = 100_000, 300
    sample = sample_positions(d, k)
    g = torch.rand(d, generator=torch.Generator().manual_seed(0))
    e = torch.zeros(d)
    if case == "too few":
        e[sample[:200]] = 10.0 - g[sample[:200]]       # ~200 tens, all in the sample
    elif case == "head":
        g[:7] = 5.0
    else:
        g[sample] = 0.0
        g[:7] = 5.0                                    # in the head when p is misaligned
        assert int(g[sample].count_nonzero()) <= 7     # the sample's bound is still 0
    want = g + e
    q_want, idx_want, vals_want = run_topk("torch", want, [(0, d, k)], torch.float32)
    assert idx_want.tolist() == reference_positions(want, [(0, d, k)]).tolist()
    for name in BACKENDS:
        p = torch.empty(d + 8)[shift:shift + d]
        idx, vals = torch.empty(k, dtype=torch.int32), torch.empty(k)
        with backend(name):
            assert K.topk_take_sum(g, e, p, torch.tensor([[0, d, k]]), idx, vals)
        assert torch.equal(idx, idx_want) and torch.equal(bits(vals), bits(vals_want)), name
        assert torch.equal(bits(p), bits(q_want)), name


@pytest.mark.parametrize("name", BACKENDS)
def test_topk_take_sum_refuses_overlap_and_wrong_shapes(name):
    g, e, p = torch.randn(20), torch.randn(20), torch.empty(20)
    i2, v2 = torch.empty(2, dtype=torch.int32), torch.empty(2)
    big = torch.zeros(40)
    segs = [(0, 20, 2)]
    cases = [(ValueError, lambda: K.topk_take_sum(g, e, g, segs, i2, v2)),
             (ValueError, lambda: K.topk_take_sum(big[:20], e, big[10:30], segs, i2, v2)),
             (ValueError, lambda: K.topk_take_sum(g, e[:19], p, segs, i2, v2)),
             (ValueError, lambda: K.topk_take_sum(g, e, p, [(0, 20, 3)], i2, v2)),
             (ValueError, lambda: K.topk_take_sum(g, e, p, [(15, 10, 2)], i2, v2)),
             (TypeError, lambda: K.topk_take_sum(g.double(), e, p, segs, i2, v2)),
             (TypeError, lambda: K.topk_take_sum(g, e, p, segs, i2.long(), v2))]
    with backend(name):
        for exc, fn in cases:
            with pytest.raises(exc):
                fn()


@pytest.mark.parametrize("case", ["idx in g", "vals in e", "misaligned p", "e short"])
def test_native_topk_take_sum_rechecks(case):
    """The extension's own checks: the pairs must not overlap g or e (they are read while
    the pairs are written)."""
    g, e, p = np.ones(20, np.float32), np.ones(20, np.float32), np.zeros(20, np.float32)
    i, v = np.zeros(2, np.int32), np.zeros(2, np.float32)
    segs = np.array([[0, 20, 2]], np.int64)
    args = {"idx in g": (g, e, p, segs, g[:2].view(np.int32), v),
            "vals in e": (g, e, p, segs, i, e[:2]),
            "misaligned p": (g, e, misaligned(20), segs, i, v),
            "e short": (g, e[:19], p, segs, i, v)}[case]
    with pytest.raises((TypeError, ValueError)):
        NATIVE.topk_take_sum(*args)


def _step_ctx(layout, step):
    return StepContext(step=step, rank=0, size=1, bucket="b", offset=0, layout=layout)


@pytest.mark.parametrize("method,options", [
    ("topk", {}), ("topk", {"ratio": 0.05, "values": "fp16", "scope": "bucket"}),
    ("threshold", {"lam": 1.2}), ("threshold", {"lam": 0.05}),      # dense fallbacks
])
@pytest.mark.parametrize("sizes", [[37, 1, 130, 2000, 9], [30_000, 3, 70_001]])
def test_fused_sparse_step_is_the_unfused_one_and_rotates_the_memory(method, options, sizes):
    """Without perturbation topk and threshold compensate out of place (the memory buffers
    rotate: no backup in the engine) and check NaN/Inf in that pass (Top-k: in its selection,
    topk_take_sum; the large tensors take its sampled candidate scan); payloads and memory
    are the unfused path's bit for bit, a NaN leaves the memory as it was, rollback restores
    it."""
    torch.manual_seed(1)
    layout = Layout.for_sizes(sizes)
    fused, plain = make_method(method, **options), make_method(method, **options)
    plain.fused = False
    assert fused.fused and fused.encode_checks_finite and fused.self_restored_keys == ("error",)
    sf, sp = fused.init_state(layout), plain.init_state(layout)
    for step in range(5):
        g = torch.zeros(layout.numel)
        for o, s in layout.segments():
            g[o:o + s] = torch.randn(s) * (step + 1)
        before = sf["error"]
        assert torch.equal(fused.encode(g, sf, _step_ctx(layout, step)),
                           plain.encode(g, sp, _step_ctx(layout, step)))
        assert torch.equal(bits(sf["error"]), bits(sp["error"])), step
        assert sf["error"] is not before and sf.pending            # rotated, not copied
    kept = sf["error"].clone()
    g[3] = math.nan
    ctx = _step_ctx(layout, 5)
    msg = fused.encode(g, sf, ctx)
    assert ctx.nonfinite and torch.equal(sf["error"], kept)
    (p,) = wire.split(msg, 1, bucket="b", codec=fused.codec.codec, n=layout.numel)
    assert p.header.flags & wire.FLAG_NONFINITE
    g[3] = 1.0
    fused.encode(g * 0.01, sf, _step_ctx(layout, 6))      # small: no dense fallback
    assert not torch.equal(sf["error"], kept)
    fused.rollback(sf)                                # another rank failed this step
    assert torch.equal(sf["error"], kept)


def test_perturbed_sparse_methods_stay_unfused():
    for method in ("topk", "threshold"):
        assert not make_method(method, noise=0.5).fused
        assert not make_method(method, reset_every=3).fused
        assert make_method(method).fused
