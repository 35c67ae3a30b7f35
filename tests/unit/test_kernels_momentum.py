"""The fused momentum kernels of Signum and SSDM (kernels.momentum_sign / momentum_absmax,
native/sg_momentum.h): every native ISA against the torch fallback bit for bit, both against an
independent numpy reference, a signum/ssdm step through the fused path against the unfused
reference, and the momentum through the engine's NaN/Inf handling (rollback).

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
from hvd_signsgd.codecs import Layout
from hvd_signsgd.kernels import _torch as T
from hvd_signsgd.methods import MemoryState, StepContext, make_method
from hvd_signsgd.simulate import Simulation

NATIVE = K._native
assert NATIVE is not None, f"native extension missing: {K._native_unavailable}"
ISAS = NATIVE.available_isas()
SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EDGE_SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 4095, 4096, 4097]
SIZES = st.one_of(st.sampled_from(EDGE_SIZES), st.integers(0, 3000))
BETAS = st.one_of(st.sampled_from([0.0, 0.9, 0.5, 0.99, 1.0 - 1.0 / math.sqrt(3.0)]),
                  st.floats(0.0, 0.999999))
KINDS = st.lists(st.sampled_from(["normal", "zeros", "subnormal", "cancel", "huge", "nan",
                                  "inf", "tail_nan"]), min_size=1, max_size=3)


def bits_of(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def make_inputs(n, kinds, seed):
    """g, m with the special values of `kinds` mixed in (NaN/Inf at a random position, or in
    the last element: the scalar tail of the vector loops)."""
    rng = np.random.default_rng(seed)
    g = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    m = torch.from_numpy((rng.standard_normal(n) * 0.1).astype(np.float32))
    pick = lambda: torch.from_numpy(rng.random(n) < 0.2)  # noqa: E731
    sign = lambda: torch.where(torch.from_numpy(rng.random(n) < 0.5), 0.0, -0.0)  # noqa: E731
    if "zeros" in kinds:            # +-0 in g and m (and both: m_out = +-0)
        k = pick()
        g[k] = sign()[k]
        k = pick()
        m[k] = sign()[k]
    if "subnormal" in kinds:
        k = pick()
        g[k] = torch.from_numpy((rng.standard_normal(n) * 1e-39).astype(np.float32))[k]
        m[k] = torch.from_numpy((rng.standard_normal(n) * 1e-40).astype(np.float32))[k]
    if "cancel" in kinds:           # beta = 0.5: 0.5 m + 0.5 g = +0 exactly
        k = pick()
        m[k] = -g[k]
    if "huge" in kinds:             # products near the top of the range; sums may overflow
        k = pick()
        g[k] = 3.3e38
        m[k] = 3.3e38
    if n:
        if "nan" in kinds:
            g[int(rng.integers(0, n))] = math.nan
        if "inf" in kinds:
            m[int(rng.integers(0, n))] = -math.inf
        if "tail_nan" in kinds:
            g[n - 1] = math.nan
    return g, m


def numpy_momentum(g, m, beta):
    a, b = np.float32(beta), np.float32(1.0 - beta)
    with np.errstate(all="ignore"):
        return (a * m.numpy() + b * g.numpy()).astype(np.float32)    # float32 throughout


def run_isa(name, fn, g, m, beta, out=None):
    previous = NATIVE.set_isa(name)
    try:
        out = torch.full_like(m, 12345.0) if out is None else out
        return fn(g, m, out, beta), out
    finally:
        NATIVE.set_isa(previous)


@SETTINGS
@given(n=SIZES, kinds=KINDS, beta=BETAS, seed=st.integers(0, 2**32 - 1))
@example(n=(1 << 20) + 3, kinds=["normal", "zeros"], beta=0.9, seed=1)
@example(n=13, kinds=["tail_nan"], beta=0.9, seed=0)
@example(n=64, kinds=["cancel"], beta=0.5, seed=0)
@example(n=9, kinds=["zeros"], beta=0.0, seed=2)
@example(n=0, kinds=["normal"], beta=0.9, seed=0)
def test_native_equals_torch_and_numpy(n, kinds, beta, seed):
    g, m = make_inputs(n, kinds, seed)
    g0, m0 = g.clone(), m.clone()
    ref = numpy_momentum(g, m, beta)
    finite = bool(np.isfinite(ref).all())
    want_out = torch.empty_like(m)
    want = T.momentum_sign(g, m, want_out, beta)
    want_out2 = torch.empty_like(m)
    want2 = T.momentum_absmax(g, m, want_out2, beta)
    assert (want is None) == (want2 is None) == (not finite)
    if finite:                      # the fallback is the definition (numpy), bit for bit
        assert np.array_equal(want_out.numpy().view(np.int32), ref.view(np.int32))
        assert torch.equal(bits_of(want_out2), bits_of(want_out))
        assert torch.equal(want[0], torch.from_numpy(np.packbits(np.signbit(ref),
                                                                 bitorder="little")))
        assert torch.equal(want[1], torch.from_numpy(np.packbits(ref == 0, bitorder="little")))
        assert want[2] == want2[1] == int((ref == 0).sum())
        assert want2[0] == (float(np.abs(ref).max()) if n else 0.0)
    for name in ISAS:
        got, out = run_isa(name, K.momentum_sign, g, m, beta)
        got2, out2 = run_isa(name, K.momentum_absmax, g, m, beta)
        assert torch.equal(bits_of(g), bits_of(g0)) and torch.equal(bits_of(m), bits_of(m0))
        assert (got is None) == (want is None) and (got2 is None) == (want2 is None), name
        if want is None:
            continue
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name
        assert got[2] == want[2] and got2 == want2, name
        assert torch.equal(bits_of(out), bits_of(want_out)), name
        assert torch.equal(bits_of(out2), bits_of(want_out)), name


def test_the_unfused_method_update_is_not_torch_add_with_alpha():
    """Why the definition is spelled out: the same inputs through add_(g, alpha=) may differ
    in the last bit (FMA), through momentum_update never. Shows the fallback is the numpy
    definition on a size with a vector body and a tail."""
    g, m = make_inputs(4099, ["normal", "subnormal"], 3)
    for beta in (0.9, 0.37, 0.0):
        out = torch.empty_like(m)
        T.momentum_update(g, m, out, beta)
        assert np.array_equal(out.numpy().view(np.int32),
                              numpy_momentum(g, m, beta).view(np.int32))
        inplace = m.clone()
        T.momentum_update(g, inplace, inplace, beta)
        assert torch.equal(bits_of(inplace), bits_of(out))


def test_argument_errors():
    g = torch.zeros(16)
    for fn in (K.momentum_sign, K.momentum_absmax):
        with pytest.raises(ValueError, match="must not be"):
            fn(g, g.clone(), g, 0.9)
        m = torch.zeros(16)
        with pytest.raises(ValueError, match="must not be"):
            fn(g, m, m, 0.9)
        with pytest.raises(TypeError):
            fn(g.double(), g, torch.empty(16), 0.9)
        with pytest.raises(ValueError, match="same number"):
            fn(g, torch.zeros(8), torch.empty(16), 0.9)
        with pytest.raises(ValueError, match="finite"):
            fn(g, torch.zeros(16), torch.empty(16), math.nan)
        with pytest.raises(ValueError, match="1-D, contiguous"):
            fn(g, torch.zeros(32)[::2], torch.empty(16), 0.9)
    with pytest.raises(ValueError, match="overlaps"):     # the extension's own check
        buf = torch.zeros(40).numpy()
        NATIVE.momentum_sign(buf[:16], buf[:16], buf[8:24], 0.9, bytearray(2), bytearray(2))
    with pytest.raises(ValueError, match="too small"):
        NATIVE.momentum_sign(g.numpy(), g.numpy(), torch.empty(16).numpy(), 0.9,
                             bytearray(1), bytearray(2))


@pytest.mark.parametrize("shift", [0, 1, 3])
def test_unaligned_buffers_give_the_same_result(shift):
    """m_out at a 32-byte boundary takes the streaming-store path of signum's and ssdm's
    kernels, elsewhere the plain one; g and m off any boundary: every combination gives the
    fallback's bits."""
    n = 5 * 1024 + 13
    g0, m0 = make_inputs(n, ["normal", "zeros"], 7)
    want_out = torch.empty(n)
    want = T.momentum_sign(g0, m0, want_out, 0.9)
    want2 = T.momentum_absmax(g0, m0, torch.empty(n), 0.9)
    base = torch.zeros(2 * (n + 8))
    g, m = base[shift:shift + n], base[n + 8 + shift:2 * n + 8 + shift]
    g.copy_(g0)
    m.copy_(m0)
    for name in ISAS:
        for fn, expect in ((K.momentum_sign, want), (K.momentum_absmax, want2)):
            out = torch.full((n + 8,), 7.0)[shift:shift + n]
            got, _ = run_isa(name, fn, g, m, 0.9, out=out)
            if fn is K.momentum_sign:
                assert all(torch.equal(a, b) for a, b in zip(got[:2], expect[:2])), name
                assert got[2] == expect[2]
            else:
                assert got == expect, name
            assert torch.equal(bits_of(out), bits_of(want_out)), name


# ---- the methods: fused against the unfused reference ----------------------------------------


def _ctx(layout, step=0, rank=0):
    return StepContext(step=step, rank=rank, size=1, bucket="b", offset=0, layout=layout)


def _grads(layout, steps, seed):
    """Per step a gradient over the layout (gap elements 0) with zero runs: a tensor whose
    gradient is 0 for some steps (its momentum decays but stays non-zero), another that is
    always 0 (momentum exactly 0: marked), +-0 mixed in."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(steps):
        g = torch.from_numpy(rng.standard_normal(layout.numel).astype(np.float32))
        for t, (o, s) in enumerate(layout.segments()):
            if t == 1 or (t == 2 and k % 3 == 1):
                g[o:o + s] = -0.0 if k % 2 else 0.0
        real = torch.zeros(layout.numel, dtype=torch.bool)
        for o, s in layout.segments():
            real[o:o + s] = True
        g[~real] = 0.0
        out.append(g)
    return out


METHOD_CASES = [("signum", {}), ("signum", {"beta": 0.0}), ("signum", {"aggregation": "mean"}),
                ("ssdm", {}), ("ssdm", {"beta": "schedule"}), ("ssdm", {"norm_type": "l2"}),
                ("ssdm", {"norm": "bucket"}), ("ssdm", {"beta": 0.0, "norm": "bucket"})]


@pytest.mark.parametrize("name,options", METHOD_CASES)
def test_fused_step_equals_the_unfused_reference(name, options):
    """The same gradients through fused (default) and fused=False instances: identical
    payload bytes, momentum and update, step after step (with zero marks)."""
    layout = Layout.for_sizes([100, 37, 9, 4097])
    fused, ref = make_method(name, **options), make_method(name, **options)
    ref.fused = False
    assert fused.encode_checks_finite and fused.self_restored_keys == ("momentum",)
    assert not ref.encode_checks_finite and ref.self_restored_keys == ()
    sf, sr = fused.init_state(layout), ref.init_state(layout)
    marked = 0
    for k, g in enumerate(_grads(layout, 7, 11)):
        msgs = []
        for method, state in ((fused, sf), (ref, sr)):
            ctx = _ctx(layout, k)
            method.prepare(g, state, ctx)
            if method.model_scope:
                ctx.model_norm = method.combine_norms([method.norm_part(g, state, ctx)])
            msgs.append(method.encode(g, state, ctx))
            method.commit(state)
        assert torch.equal(msgs[0], msgs[1]), k
        assert torch.equal(bits_of(sf["momentum"]), bits_of(sr["momentum"])), k
        payload = wire.split(msgs[0], 1, bucket="b", codec=fused.codec.codec, n=layout.numel)
        marked += bool(payload[0].header.flags & wire.FLAG_ZEROS)
    assert marked            # the zero marks were exercised


@pytest.mark.parametrize("name,options", METHOD_CASES[:1] + METHOD_CASES[3:5])
def test_simulator_agrees_fused_and_unfused(name, options):
    """simulate.py (3 ranks) gives the same updates with either path."""
    sizes = [300, 41]
    sims = [Simulation(name, 3, sizes, seed=5, **options) for _ in range(2)]
    sims[1].method.fused = False
    rng = np.random.default_rng(3)
    for _ in range(4):
        grads = [[torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in sizes]
                 for _ in range(3)]
        a, b = (sim.step(grads) for sim in sims)
        assert torch.equal(bits_of(a), bits_of(b))


@pytest.mark.parametrize("name", ["signum", "ssdm"])
def test_momentum_is_swapped_on_success_and_kept_on_nan(name):
    method = make_method(name)
    layout = Layout.for_sizes([100, 7])
    state = method.init_state(layout)
    assert isinstance(state, MemoryState)

    def step(g, k):
        ctx = _ctx(layout, k)
        method.prepare(g, state, ctx)
        if method.model_scope and not ctx.nonfinite:
            ctx.model_norm = method.combine_norms([method.norm_part(g, state, ctx)])
        return ctx, method.encode(g, state, ctx)

    step(torch.randn(layout.numel), 0)
    first = state["momentum"]
    assert state.pending and state.spare is not None
    method.commit(state)
    before = first.clone()
    bad = torch.randn(layout.numel)
    bad[-1] = math.nan
    ctx, msg = step(bad, 1)
    assert ctx.nonfinite and state["momentum"] is first and torch.equal(first, before)
    assert wire.split(msg, 1, bucket="b", codec=method.codec.codec,
                      n=layout.numel)[0].header.flags & wire.FLAG_NONFINITE
    step(torch.randn(layout.numel), 1)
    assert state["momentum"] is not first
    method.rollback(state)                      # another rank failed: the old momentum is back
    assert state["momentum"] is first and torch.equal(first, before) and not state.pending


@pytest.mark.parametrize("name", ["signum", "ssdm"])
def test_plain_dict_state_still_works(name):
    method = make_method(name, **({"norm": "bucket"} if name == "ssdm" else {}))
    layout = Layout.for_sizes([33])
    state = {"momentum": torch.zeros(layout.numel)}
    want = method.init_state(layout)
    g = torch.randn(layout.numel)
    for st_ in (state, want):
        ctx = _ctx(layout)
        method.prepare(g, st_, ctx)
        method.encode(g, st_, ctx)
    assert torch.equal(state["momentum"], want["momentum"])


@pytest.mark.parametrize("name,options", [("signum", {}), ("ssdm", {}),
                                          ("ssdm", {"norm_type": "l2"})])
def test_engine_rollback_after_a_failed_step_restores_the_momentum(name, options):
    """Two buckets (ssdm: one whole-model norm over both). drain() and a step with NaN in the
    second bucket only leave both momenta as before the step, without a backup copy; the
    next steps match an engine that never saw the failed steps."""
    from hvd_signsgd.communicator import Communicator
    from hvd_signsgd.engine import Engine

    def engine():
        eng = Engine(Communicator(), make_method(name, **options))
        eng.build([(["a"], [40], None), (["b"], [13, 21], None)])
        assert all("momentum" not in b.backup for b in eng.buckets)
        return eng

    def launch(eng, fills):
        eng.begin_step()
        for b, f in zip(eng.buckets, fills):
            b.flat.copy_(f)
        eng.launch(eng.buckets)

    rng = np.random.default_rng(0)
    eng, clean = engine(), engine()
    steps = [[torch.from_numpy(rng.standard_normal(b.layout.numel).astype(np.float32))
              for b in eng.buckets] for _ in range(3)]
    launch(eng, steps[0])
    assert eng.finish().error is None
    before = [b.state["momentum"].clone() for b in eng.buckets]
    launch(eng, steps[1])
    eng.drain()
    assert all(torch.equal(b.state["momentum"], v) for b, v in zip(eng.buckets, before))
    bad = [steps[1][0], steps[1][1].clone()]
    bad[1][3] = math.nan
    launch(eng, bad)
    # a whole-model norm: the NaN in bucket b leaves no norm for bucket a either
    assert [b.ctx.nonfinite for b in eng.buckets] == [eng.method.model_scope, True]
    assert eng.finish().error is not None
    assert all(torch.equal(b.state["momentum"], v) for b, v in zip(eng.buckets, before))
    for fills in steps[1:]:
        launch(eng, fills)
        assert eng.finish().error is None
    for fills in steps:
        launch(clean, fills)
        assert clean.finish().error is None
    for b, c in zip(eng.buckets, clean.buckets):
        assert torch.equal(bits_of(b.state["momentum"]), bits_of(c.state["momentum"]))
        assert torch.equal(bits_of(b.flat), bits_of(c.flat))
    assert eng.step == clean.step == 3


# ---- signSGD's one-pass encode (kernels.sign_scan) -------------------------------------------


@SETTINGS
@given(n=SIZES, kinds=KINDS, seed=st.integers(0, 2**32 - 1), shift=st.integers(0, 7))
@example(n=(1 << 20) + 3, kinds=["normal", "zeros", "tail_nan"], seed=1, shift=0)
@example(n=17, kinds=["subnormal", "zeros"], seed=0, shift=3)
@example(n=4097, kinds=["inf"], seed=4, shift=1)
def test_sign_scan_equals_pack_signs_and_the_zero_plane(n, kinds, seed, shift):
    """Every ISA and the torch fallback: the bits of pack_signs(x), the plane of x == +-0 and
    their count, any alignment of x; None exactly when some x is NaN/Inf."""
    x0, m0 = make_inputs(n, kinds, seed)
    if "inf" in kinds and n:                        # make_inputs puts its Inf into m only
        x0[int(torch.argmax(m0.isinf().int()))] = -math.inf
    x = torch.zeros(n + 8)[shift:shift + n]
    x.copy_(x0)
    finite = bool(torch.isfinite(x0).all())
    zero = x0 == 0
    want = (K.pack_signs(x0), K.pack_bits(zero), int(zero.sum()))
    results = {"torch": T.sign_scan(x)}
    for name in ISAS:
        previous = NATIVE.set_isa(name)
        try:
            results[name] = K.sign_scan(x)
        finally:
            NATIVE.set_isa(previous)
    for name, got in results.items():
        if not finite:
            assert got is None, name
            continue
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name
        assert got[2] == want[2], name


def test_sign_scan_argument_errors():
    with pytest.raises(TypeError):
        K.sign_scan(torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError):
        K.sign_scan(torch.zeros(16)[::2])
    x, small = np.zeros(17, np.float32), np.zeros(2, np.uint8)
    with pytest.raises(ValueError):
        NATIVE.sign_scan(x, small, np.zeros(3, np.uint8))       # bits too small
    room = np.zeros(6, np.uint8)
    with pytest.raises(ValueError):
        NATIVE.sign_scan(x, room[:3], room[2:5])                 # bits and zplane overlap


@pytest.mark.parametrize("options", [{}, {"aggregation": "mean"}, {"ties": "owner"}])
def test_signsgd_one_pass_encode_is_the_unfused_payload(options):
    """signsgd (fused, default) and fused=False: identical payload bytes step after step, zero
    marks included; the fused one checks NaN/Inf itself (the engine skips its pass) and sends
    the non-finite flag."""
    layout = Layout.for_sizes([100, 37, 9, 4097])
    fused, ref = make_method("signsgd", **options), make_method("signsgd", **options)
    ref.fused = False
    assert fused.encode_checks_finite and not ref.encode_checks_finite
    assert not make_method("stochastic_sign").encode_checks_finite

    class OwnEncode(type(fused)):         # a user's subclass: the engine keeps checking for it
        def encode(self, g, state, ctx):
            return super().encode(g, state, ctx)
    assert not OwnEncode(**options).encode_checks_finite
    marked = 0
    for k, g in enumerate(_grads(layout, 5, 7)):
        msg = fused.encode(g, {}, _ctx(layout, k))
        assert torch.equal(msg, ref.encode(g, {}, _ctx(layout, k))), k
        payload = wire.split(msg, 1, bucket="b", codec=fused.codec.codec, n=layout.numel)
        marked += bool(payload[0].header.flags & wire.FLAG_ZEROS)
    assert marked
    g[5] = math.inf
    ctx = _ctx(layout, 9)
    msg = fused.encode(g, {}, ctx)
    assert ctx.nonfinite
    payload = wire.split(msg, 1, bucket="b", codec=fused.codec.codec, n=layout.numel)
    assert payload[0].header.flags & wire.FLAG_NONFINITE
