"""The fused error-feedback scaled sign (kernels.ef_sign, native/sg_fused.h): every native ISA
against the torch fallback bit for bit, both against an independent numpy reference, the
payload against the unfused codec path, and the memory through the engine's NaN/Inf handling.

Also run against an ASan/UBSan build of the extension by test_kernels_asan.py.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hvd_signsgd import kernels as K
from hvd_signsgd import wire
from hvd_signsgd.codecs import Layout, ScaledSign, count_zeros, segment_pairs
from hvd_signsgd.kernels import _torch as T
from hvd_signsgd.methods import MemoryState, StepContext, make_method

NATIVE = K._native
assert NATIVE is not None, f"native extension missing: {K._native_unavailable}"
ISAS = NATIVE.available_isas()
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EDGE_SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 4095, 4096, 4097]
SIZES = st.lists(st.one_of(st.sampled_from(EDGE_SIZES), st.integers(0, 3000)), min_size=1,
                 max_size=5)
# what the values are drawn from: gaussians, exact zeros of both signs, subnormals, values
# whose |p| sums overflow, and NaN / Inf
KINDS = st.lists(st.sampled_from(["normal", "zeros", "subnormal", "cancel", "huge", "nan",
                                  "inf"]), min_size=1, max_size=3)


def bits_of(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def make_inputs(layout, kinds, seed):
    """g, e over the layout (gap elements 0) with the special values of `kinds` mixed in."""
    rng = np.random.default_rng(seed)
    n = layout.numel
    g = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    e = torch.from_numpy((rng.standard_normal(n) * 0.1).astype(np.float32))
    pick = lambda: torch.from_numpy(rng.random(n) < 0.2)  # noqa: E731
    if "zeros" in kinds:
        m = pick()
        g[m] = torch.where(torch.from_numpy(rng.random(n) < 0.5), 0.0, -0.0)[m]
        e[m] = torch.where(torch.from_numpy(rng.random(n) < 0.5), 0.0, -0.0)[m]
    if "subnormal" in kinds:
        m = pick()
        g[m] = torch.from_numpy((rng.standard_normal(n) * 1e-39).astype(np.float32))[m]
        e[m] = torch.from_numpy((rng.standard_normal(n) * 1e-40).astype(np.float32))[m]
    if "cancel" in kinds:          # p = g + (-g): exactly +0
        m = pick()
        e[m] = -g[m]
    if "huge" in kinds:
        m = pick()
        g[m] = 3e38
    for kind, value in (("nan", math.nan), ("inf", -math.inf)):
        if kind in kinds and n:
            g[int(rng.integers(0, n))] = value
    real = torch.zeros(n, dtype=torch.bool)
    for o, s in layout.segments():
        real[o:o + s] = True
    g[~real] = 0.0
    e[~real] = 0.0
    return g, e


def run_isa(name, g, e, layout):
    previous = NATIVE.set_isa(name)
    try:
        out = torch.full_like(e, 12345.0)
        return K.ef_sign(g, e, out, segment_pairs(layout)), out
    finally:
        NATIVE.set_isa(previous)


def numpy_reference(g, e, layout, result):
    """Checks result (bits, zplane, scales, zeros) and the memory without the kernels' code;
    the scale itself up to summation order."""
    p = (g.numpy() + e.numpy()).astype(np.float32)
    bits, zplane, scales, zeros = result
    zero = p == 0
    assert torch.equal(bits, torch.from_numpy(np.packbits(np.signbit(p), bitorder="little")))
    assert torch.equal(zplane, torch.from_numpy(np.packbits(zero, bitorder="little")))
    real = np.zeros(p.size, dtype=bool)
    for t, (o, s) in enumerate(layout.segments()):
        real[o:o + s] = True
        z = int(zero[o:o + s].sum())
        assert int(zeros[t]) == z
        want = np.abs(p[o:o + s]).astype(np.float64).sum() / max(s - z, 1)
        assert float(scales[t]) == pytest.approx(want, rel=1e-5, abs=1e-45)
    assert int(zeros[-1]) == int(zero[~real].sum())


@SETTINGS
@given(sizes=SIZES, kinds=KINDS, seed=st.integers(0, 2**32 - 1))
@example(sizes=[(1 << 20) + 3, 5], kinds=["normal", "zeros"], seed=1)
@example(sizes=[1], kinds=["cancel"], seed=0)
@example(sizes=[0], kinds=["normal"], seed=0)
def test_native_equals_torch_and_the_reference(sizes, kinds, seed):
    layout = Layout.for_sizes(sizes)
    g, e = make_inputs(layout, kinds, seed)
    e_before = e.clone()
    want_out = torch.empty_like(e)
    want = T.ef_sign(g, e, want_out, list(layout.segments()))
    finite = bool(torch.isfinite(g + e).all())
    if not finite:
        assert want is None
    for name in ISAS:
        got, out = run_isa(name, g, e, layout)
        assert torch.equal(bits_of(e), bits_of(e_before))     # e is only read
        assert (got is None) == (want is None), name
        if want is None:
            continue
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(bits_of(a), bits_of(b)), name
        assert torch.equal(bits_of(out), bits_of(want_out)), name
    if want is not None:
        numpy_reference(g, e, layout, want)
        p = g + e
        for t, (o, s) in enumerate(layout.segments()):
            seg = p[o:o + s]
            q = torch.where(seg == 0, 0.0, torch.copysign(want[2][t], seg))
            assert torch.equal(bits_of(want_out[o:o + s]), bits_of(seg - q))
        gaps = torch.ones(layout.numel, dtype=torch.bool)
        for o, s in layout.segments():
            gaps[o:o + s] = False
        assert torch.equal(bits_of(want_out[gaps]), bits_of(p[gaps]))


def test_tree_sum_order():
    """The fixed order: 64-element blocks (rows in order per lane, then the lane tree), then
    the block sums the same way."""
    x = torch.arange(1, 64 * 64 + 2, dtype=torch.float32) * 1.1
    blocks = []
    padded = torch.cat([x, torch.zeros(64 * 65 - x.numel())]).view(-1, 64)
    for blk in padded:
        v = blk[:8].clone()
        for r in range(1, 8):
            v = v + blk[8 * r:8 * r + 8]
        a = v[:4] + v[4:]
        blocks.append((a[0] + a[2]) + (a[1] + a[3]))
    level = torch.stack(blocks)
    assert torch.equal(T.tree_abs_sum(-x), T.tree_abs_sum(torch.cat([level, torch.zeros(0)])))
    got, _ = run_isa(ISAS[-1], x, torch.zeros_like(x), Layout.for_sizes([x.numel()]))
    assert torch.equal(got[2][0], T.tree_abs_sum(x) / torch.tensor(float(x.numel())))


def test_argument_errors():
    g = torch.zeros(16)
    with pytest.raises(ValueError, match="multiples of 8"):
        K.ef_sign(g, g.clone(), torch.empty(16), [(4, 4)])
    with pytest.raises(ValueError, match="multiples of 8"):
        K.ef_sign(g, g.clone(), torch.empty(16), torch.tensor([[8, 9]]))
    with pytest.raises(ValueError, match="must not be"):
        K.ef_sign(g, g.clone(), g, [(0, 16)])
    with pytest.raises(TypeError):
        K.ef_sign(g.double(), g, torch.empty(16), [(0, 16)])
    with pytest.raises(ValueError, match="same number"):
        K.ef_sign(g, torch.zeros(8), torch.empty(16), [(0, 8)])


@SETTINGS
@given(sizes=SIZES, kinds=st.lists(st.sampled_from(["normal", "zeros", "subnormal", "cancel"]),
                                   min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_payload_is_the_unfused_codecs_but_for_the_scale_order(sizes, kinds, seed):
    """Against ScaledSign.encode + subtract_local on p = g + e (the unfused path): the same
    header, sign bits and zero marks; scales within float32 rounding of torch's sum; and the
    unfused residual computed with the fused scales is the fused memory, bit for bit."""
    layout = Layout.for_sizes(sizes)
    g, e = make_inputs(layout, kinds, seed)
    codec = ScaledSign()
    out = torch.empty_like(e)
    msg = codec.encode_fused(g, e, out, layout)
    p = g + e
    z = count_zeros(p, layout)
    old_scales = codec.scales(p, layout, zeros=z)
    old = codec.encode(p, layout, old_scales, zeros=z)
    new_p = wire.split(msg, 1, bucket="t", codec="scaled_sign", n=layout.numel)[0]
    old_p = wire.split(old, 1, bucket="t", codec="scaled_sign", n=layout.numel)[0]
    assert new_p.header == old_p.header
    assert msg.numel() == old.numel()
    assert (new_p.body is None) == (old_p.body is None)
    if new_p.body is not None:
        assert torch.equal(new_p.body, old_p.body)
    assert (new_p.zeros is None) == (old_p.zeros is None)
    if new_p.zeros is not None:
        assert torch.equal(new_p.zeros, old_p.zeros)
    assert torch.allclose(new_p.scales, old_p.scales, rtol=1e-5, atol=0)
    ref = p.clone()
    codec.subtract_local(ref, new_p.scales, layout, zeros=z)
    assert torch.equal(bits_of(out), bits_of(ref))


def _ctx(layout, step=0):
    return StepContext(step=step, rank=0, size=1, bucket="b", offset=0, layout=layout)


def test_memory_is_swapped_on_success_and_kept_on_nan():
    method = make_method("ef_signsgd")
    layout = Layout.for_sizes([100, 7])
    state = method.init_state(layout)
    assert isinstance(state, MemoryState) and method.self_restored_keys == ("error",)
    g = torch.randn(layout.numel)
    method.encode(g, state, _ctx(layout))
    first = state["error"]
    assert state.pending and state.spare is not None
    before = first.clone()
    bad = torch.randn(layout.numel)
    bad[50] = math.nan
    ctx = _ctx(layout, 1)
    msg = method.encode(bad, state, ctx)
    assert ctx.nonfinite and state["error"] is first and torch.equal(first, before)
    assert wire.split(msg, 1, bucket="b", codec="scaled_sign",
                      n=layout.numel)[0].header.flags & wire.FLAG_NONFINITE
    method.encode(torch.randn(layout.numel), state, _ctx(layout, 2))
    assert state["error"] is not first
    method.rollback(state)                      # another rank failed: the old memory is back
    assert state["error"] is first and torch.equal(first, before) and not state.pending
    method.rollback(state)                      # nothing left to undo
    assert state["error"] is first


def test_plain_dict_state_still_works():
    method = make_method("ef_signsgd")
    layout = Layout.for_sizes([33])
    state = {"error": torch.zeros(layout.numel)}
    g = torch.randn(layout.numel)
    method.encode(g, state, _ctx(layout))
    want = MemoryState(error=torch.zeros(layout.numel))
    method.encode(g, want, _ctx(layout))
    assert torch.equal(state["error"], want["error"])


def test_engine_rollback_after_a_failed_step_restores_the_memory():
    """drain() (an error between launch and finish) and a non-finite step on this rank both
    leave the error memory as before the step, without a backup copy of it."""
    from hvd_signsgd.communicator import Communicator
    from hvd_signsgd.engine import Engine
    eng = Engine(Communicator(), make_method("ef_signsgd"))
    eng.build([(["a", "b"], [40, 13], None)])
    (b,) = eng.buckets
    assert "error" not in b.backup

    def launch(fill):
        eng.begin_step()
        b.flat.copy_(fill)
        eng.launch([b])

    launch(torch.randn(b.layout.numel))
    assert eng.finish().error is None
    before = b.state["error"].clone()
    launch(torch.randn(b.layout.numel))
    eng.drain()
    assert torch.equal(b.state["error"], before)
    bad = torch.randn(b.layout.numel)
    bad[0] = math.inf
    launch(bad)
    assert eng.finish().error is not None
    assert torch.equal(b.state["error"], before)
    launch(torch.randn(b.layout.numel))
    assert eng.finish().error is None and not torch.equal(b.state["error"], before)
    assert eng.step == 2


@pytest.mark.parametrize("shift", [0, 1, 3])
def test_unaligned_buffers_give_the_same_result(shift):
    """e_out at a 32-byte boundary takes the streaming-store path, elsewhere the plain one;
    g and e off any boundary: every combination gives the fallback's bits."""
    layout = Layout.for_sizes([1000, 77, 4097])
    g0, e0 = make_inputs(layout, ["normal", "zeros"], 7)
    n = layout.numel
    want_out = torch.empty(n)
    want = T.ef_sign(g0, e0, want_out, list(layout.segments()))
    base = torch.zeros(3 * (n + 8))
    g = base[shift:shift + n]
    e = base[n + 8 + shift:2 * n + 8 + shift]
    out = torch.full((n + 8,), 7.0)[shift:shift + n]
    g.copy_(g0)
    e.copy_(e0)
    for name in ISAS:
        previous = NATIVE.set_isa(name)
        try:
            got = K.ef_sign(g, e, out, segment_pairs(layout))
        finally:
            NATIVE.set_isa(previous)
        for a, b in zip(got, want):
            assert torch.equal(bits_of(a), bits_of(b)), name
        assert torch.equal(bits_of(out), bits_of(want_out)), name
