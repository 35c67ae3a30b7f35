"""ALGORITHMS.md sections 5-8 with the real codecs and aggregation, n virtual ranks in one process
(hvd_signsgd.simulate): the sparse codec, Top-k selection, the EF invariants, hard threshold,
Random-k, perturbation (saddle escape) and ErrorCompensatedX. Cross-rank behaviour under real
MPI / Gloo is in tests/multirank/test_sparse_optimizer.py."""
import math

import pytest
import torch

from hvd_signsgd import make_method, wire
from hvd_signsgd.codecs import Layout, Sparse
from hvd_signsgd.methods import NonFiniteGradientError, StepContext, sparse
from hvd_signsgd.methods.ecx import storm_direction
from hvd_signsgd.methods.sparse import sample_without_replacement, threshold_for, topk_indices
from hvd_signsgd.simulate import Simulation


def round4(n):
    return (n + 3) // 4 * 4


def ctx_for(sim, rank, step):
    """The StepContext Simulation gave `rank` at `step` (for replaying a method's streams)."""
    return StepContext(step=step, rank=rank, size=sim.n, bucket="sim", offset=0,
                       layout=sim.layout, seed=sim.seed)


# --- the sparse codec -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,per_pair", [(torch.float32, 8), (torch.float16, 6)])
@pytest.mark.parametrize("nnz", [0, 1, 3, 7, 100])
def test_sparse_payload_length_and_round_trip(dtype, per_pair, nnz):
    codec = Sparse(dtype)
    idx = torch.randperm(1000)[:nnz].sort().values
    vals = torch.randn(nnz)
    msg = codec.encode(idx, vals, 1000)
    assert msg.numel() == wire.HEADER_NBYTES + round4(per_pair * nnz)
    (p,) = wire.split(msg, 1, bucket="b", codec=codec.codec, n=1000)
    got_idx, got_vals = codec.decode(p)
    assert got_idx.tolist() == idx.tolist()
    assert torch.equal(got_vals.float(), vals.to(dtype).float())


def test_sparse_dense_fallback_payload_is_float32_for_both_codecs():
    for dtype in (torch.float32, torch.float16):
        codec = Sparse(dtype)
        x = torch.randn(13)
        msg = codec.encode_dense(x)
        assert msg.numel() == wire.HEADER_NBYTES + 4 * 13
        (p,) = wire.split(msg, 1, bucket="b", codec=codec.codec, n=13)
        assert p.header.flags & wire.FLAG_DENSE
        assert torch.equal(codec.aggregate([p], 13), x)


def test_sparse_aggregate_is_the_sum_of_every_ranks_pairs():
    codec = Sparse()
    n = 50
    msgs = [codec.encode(torch.tensor([1, 7, 49]), torch.tensor([1.0, 2.0, 3.0]), n),
            codec.encode(torch.zeros(0, dtype=torch.long), torch.zeros(0), n),   # nothing
            codec.encode_dense(torch.full((n,), 0.5)),
            codec.encode(torch.tensor([7]), torch.tensor([-4.0]), n)]
    payloads = wire.split(torch.cat(msgs), 4, bucket="b", codec="sparse32", n=n)
    out = codec.aggregate(payloads, n)
    want = torch.full((n,), 0.5)
    want[1] += 1.0
    want[7] += 2.0 - 4.0
    want[49] += 3.0
    assert torch.equal(out, want)


def test_sparse_aggregate_is_order_fixed_hence_bit_identical():
    """The same gathered bytes give the same bits, and the rank order is the summation order."""
    codec = Sparse()
    gen = torch.Generator().manual_seed(0)
    msgs = []
    for _ in range(4):
        idx = torch.randperm(10_000, generator=gen)[:3000].sort().values
        msgs.append(codec.encode(idx, torch.randn(3000, generator=gen) * 1e3, 10_000))
    buf = torch.cat(msgs)
    a = codec.aggregate(wire.split(buf, 4, bucket="b", codec="sparse32", n=10_000), 10_000)
    b = codec.aggregate(wire.split(buf.clone(), 4, bucket="b", codec="sparse32", n=10_000),
                        10_000)
    assert torch.equal(a, b)


def test_sparse_rejects_indices_out_of_range():
    codec = Sparse()
    msg = codec.encode(torch.tensor([3, 20]), torch.tensor([1.0, 1.0]), 20)
    with pytest.raises(wire.PayloadError, match="rank 0 for bucket b0 has indices outside"):
        codec.aggregate(wire.split(msg, 1, bucket="b0", codec="sparse32", n=20), 20, "b0")


def test_fp16_values_clamp_instead_of_overflowing():
    codec = Sparse(torch.float16)
    q = codec.quantize(torch.tensor([1e6, -1e6, 0.1]))
    assert q.tolist()[:2] == [65504.0, -65504.0] and torch.isfinite(q).all()


# --- Top-k selection ------------------------------------------------------------------------------

def reference_topk(a, k):
    """k largest, ties to the lowest index: a stable descending sort."""
    return torch.sort(a, descending=True, stable=True).indices[:k].sort().values


@pytest.mark.parametrize("d,k", [(1, 1), (10, 3), (1000, 1), (1000, 999), (1000, 1000),
                                 (5000, 50), (300_000, 300), (300_000, 3000)])
def test_topk_indices_is_exactly_the_documented_set(d, k):
    gen = torch.Generator().manual_seed(d + k)
    a = torch.randn(d, generator=gen).abs()
    assert torch.equal(topk_indices(a, k), reference_topk(a, k))


@pytest.mark.parametrize("sampled", [False, True])
def test_topk_indices_breaks_ties_towards_the_lowest_index(sampled, monkeypatch):
    if sampled:
        monkeypatch.setattr(sparse, "SAMPLED_MIN_NUMEL", 1)
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 20, (200_000,), generator=gen).float()   # massive ties
    a[::7] = 0.0
    for k in (1, 100, 5_000, 60_000):
        assert torch.equal(topk_indices(a, k), reference_topk(a, k)), k


def test_topk_indices_sampled_path_falls_back_when_the_estimate_is_too_high(monkeypatch):
    monkeypatch.setattr(sparse, "SAMPLED_MIN_NUMEL", 1)
    monkeypatch.setattr(sparse, "_sampled_threshold", lambda a, k: float(a.max()))  # 1 candidate
    a = torch.randn(200_000, generator=torch.Generator().manual_seed(2)).abs()
    assert torch.equal(topk_indices(a, 2000), reference_topk(a, 2000))


def test_topk_counts_layer_wise_and_per_bucket():
    layout = Layout.for_sizes([235, 1551, 3])
    assert make_method("topk").counts(layout) == [3, 16, 1]
    assert make_method("topk", ratio=0.1, scope="bucket").counts(layout) == [179]
    assert make_method("topk", k=5).counts(layout) == [5, 5, 3]


def test_topk_layer_wise_sends_the_largest_of_each_tensor():
    sim = Simulation("topk", n_ranks=1, sizes=[4, 3], k=1)
    g = sim.flatten([torch.tensor([0.1, -5.0, 0.2, 0.3]), torch.tensor([0.0, 0.01, -0.02])])
    update = sim.step([g])
    assert update.nonzero().squeeze(1).tolist() == [1, 10]     # second tensor starts at 8
    assert update[1] == -5.0 and update[10] == -0.02


def test_topk_payload_length_is_fixed_by_the_layout():
    sim = Simulation("topk", n_ranks=3, sizes=[235, 1551], ratio=0.01)
    for _ in range(3):
        sim.step([torch.randn(sim.layout.numel) * (r == 0) for r in range(3)])
        assert {m.numel() for m in sim.last_messages} == {16 + 8 * 19}


# --- the EF conservation invariant, every EF method ---------------------------------------------

def own_update(sim, r, step):
    """What rank r's message of the last step contributes (before averaging), as float64."""
    m = sim.method
    msg = sim.last_messages[r]
    if m.collective == "allreduce":            # randomk: values at the shared positions
        ctx = ctx_for(sim, r, step)
        assert not msg[-sim.n:].any()          # the status slots: nothing to report
        vals = msg[:-sim.n].double()
        if m.reset_due(ctx):
            return vals
        out = torch.zeros(sim.layout.numel, dtype=torch.float64)
        out[m.indices(ctx)] = vals
        return out
    codec = m.codec
    (p,) = wire.split(msg, 1, bucket="t", codec=codec.codec, n=sim.layout.numel)
    if isinstance(codec, Sparse):
        return codec.aggregate([p], sim.layout.numel).double()
    return codec.decode(p, sim.layout).double()


def noise_of(sim, r, step):
    z = torch.zeros(sim.layout.numel)
    sim.method.add_noise(z, ctx_for(sim, r, step))
    return z.double()


EF_CASES = [
    ("topk", {}),
    ("topk", {"ratio": 0.05, "scope": "bucket", "values": "fp16"}),
    ("threshold", {"lam": 1.5}),
    ("threshold", {"lam": 0.8, "values": "fp16"}),
    ("threshold", {"lam": 0.05}),                       # dense fallbacks
    ("randomk", {"ratio": 0.1}),
    ("topk", {"ratio": 0.02, "noise": 0.5, "reset_every": 7}),
    ("threshold", {"lam": 1.0, "noise": 0.5, "noise_seed": "shared", "reset_every": 5}),
    ("randomk", {"k": 3, "noise": 0.5, "reset_every": 6}),
]


@pytest.mark.parametrize("method,options", EF_CASES)
def test_ef_conservation_invariant(method, options):
    """sum_t q_t + e_T == sum_t (g_t + noise_t) on every rank (gradient units)."""
    torch.manual_seed(0)
    sizes = [37, 1, 130]
    sim = Simulation(method, n_ranks=3, sizes=sizes, seed=4, **options)
    perturbed = options.get("noise") or options.get("reset_every")
    assert sim.method.fused == (method != "randomk" and not perturbed)   # both paths covered
    sent = [torch.zeros(sim.layout.numel, dtype=torch.float64) for _ in range(3)]
    total = [torch.zeros(sim.layout.numel, dtype=torch.float64) for _ in range(3)]
    for step in range(40):
        grads = [sim.flatten([torch.randn(s) * (1 + t) for t, s in enumerate(sizes)])
                 for _ in range(3)]
        sim.step(grads)
        for r in range(3):
            sent[r] += own_update(sim, r, step)
            total[r] += grads[r].double() + noise_of(sim, r, step)
    for r in range(3):
        err = sim.states[r]["error"].double()
        assert torch.allclose(sent[r] + err, total[r], atol=1e-4), (method, options, r)


def test_ecx_conservation_form():
    """ECX: sum_t q_t + delta_T - (1 - alpha) delta_{T-1} == sum_t u_t."""
    torch.manual_seed(0)
    alpha = 0.1
    sim = Simulation("ecx", n_ranks=2, sizes=[37, 130], alpha=alpha)
    sent = [torch.zeros(sim.layout.numel, dtype=torch.float64) for _ in range(2)]
    total = [torch.zeros(sim.layout.numel, dtype=torch.float64) for _ in range(2)]
    prev = [torch.zeros(sim.layout.numel, dtype=torch.float64) for _ in range(2)]
    for step in range(60):
        grads = [sim.flatten([torch.randn(37), torch.randn(130)]) for _ in range(2)]
        sim.step(grads)
        for r in range(2):
            sent[r] += own_update(sim, r, step)
            total[r] += grads[r].double()
            assert torch.equal(sim.states[r]["delta2"].double(), prev[r])
            prev[r] = sim.states[r]["delta1"].double()
    for r in range(2):
        st = sim.states[r]
        lhs = sent[r] + st["delta1"].double() - (1 - alpha) * st["delta2"].double()
        assert torch.allclose(lhs, total[r], atol=1e-4)


# --- hard threshold (section 5) -------------------------------------------------------------------

def test_threshold_error_stays_below_lambda_and_density_is_about_4_percent():
    """Section 5: d = 1000, lambda = 0.05, 500 steps of Gaussian gradients whose scale spans
    1e-3 .. 3e-2 across coordinates: max |e_i| < lambda after every step, density ~4%."""
    torch.manual_seed(0)
    scale = torch.logspace(-3, -1.5, 1000)
    sim = Simulation("threshold", n_ranks=1, sizes=[1000], lam=0.05)
    sent = 0
    for _ in range(500):
        sim.step([torch.randn(1000) * scale])
        assert float(sim.states[0]["error"].abs().max()) < 0.05
        sent += (sim.last_messages[0].numel() - 16) // 8
    assert 0.03 < sent / 500 / 1000 < 0.05, sent / 500 / 1000       # measured: 3.7%


def test_threshold_sends_nothing_for_a_zero_gradient():
    sim = Simulation("threshold", n_ranks=2, sizes=[200], lam=10.0)
    update = sim.step([torch.zeros(200), torch.randn(200)])
    assert [m.numel() for m in sim.last_messages] == [16, 16]
    assert not update.any()


def test_threshold_dense_fallback_above_half_the_coordinates():
    layout = Layout.for_sizes([100, 50])
    method = make_method("threshold", lam=0.5)
    state = method.init_state(layout)
    ctx = StepContext(step=0, rank=0, size=1, bucket="b", offset=0, layout=layout)
    g = torch.zeros(layout.numel)
    g[:76] = 1.0                                    # 76 of 150 coordinates: just over half
    msg = method.encode(g, state, ctx)
    (p,) = wire.split(msg, 1, bucket="b", codec="sparse32", n=layout.numel)
    assert p.header.flags & wire.FLAG_DENSE and p.header.nnz == 0
    assert msg.numel() == 16 + 4 * layout.numel          # 154: the second tensor starts at 104
    assert not state["error"].any()
    assert ctx.stats == {"dense_fallbacks": 1, "nnz_sent": 150}
    g[75] = 0.0                                     # exactly half: pairs
    ctx = StepContext(step=1, rank=0, size=1, bucket="b", offset=0, layout=layout)
    msg = method.encode(g, state, ctx)
    assert msg.numel() == 16 + 8 * 75 and ctx.stats == {"nnz_sent": 75}
    everything = make_method("threshold", lam=0.5, max_density=1.0)
    ctx = StepContext(step=0, rank=0, size=1, bucket="b", offset=0, layout=layout)
    g = torch.ones(layout.numel)
    g[100:104] = 0.0                                # the layout's gap stays 0, as in the wrapper
    msg = everything.encode(g, everything.init_state(layout), ctx)
    assert msg.numel() == 16 + 8 * 150


def test_threshold_default_lambda_is_the_rule_of_thumb():
    assert threshold_for(0.001 * 11.2e6) == pytest.approx(4.72e-3, abs=1e-5)
    layout = Layout.for_sizes([10_000])
    assert make_method("threshold").lam_for(layout) == pytest.approx(1 / (2 * math.sqrt(100)))
    assert make_method("threshold", lam=0.3).lam_for(layout) == 0.3


# --- Random-k -------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,k", [(10, 10), (10, 9), (1000, 300), (1000, 10), (10**6, 1000)])
def test_sample_without_replacement(d, k):
    idx = sample_without_replacement(d, k, torch.Generator().manual_seed(3))
    assert idx.numel() == k and idx.unique().numel() == k
    assert torch.equal(idx, idx.sort().values) and 0 <= int(idx.min()) and int(idx.max()) < d


def test_sample_without_replacement_is_uniform():
    d, k, trials = 40, 5, 8000
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(d)
    for _ in range(trials):
        counts[sample_without_replacement(d, k, gen)] += 1
    p = k / d
    se = math.sqrt(trials * p * (1 - p))
    assert ((counts - trials * p).abs() < 4.5 * se).all()


def test_randomk_indices_are_identical_on_every_rank_and_change_per_step_and_bucket():
    method = make_method("randomk", ratio=0.1)
    layout = Layout.for_sizes([300, 77])

    def idx(rank, step, offset=0, seed=9):
        return method.indices(StepContext(step=step, rank=rank, size=4, bucket="b",
                                          offset=offset, layout=layout, seed=seed))
    assert all(torch.equal(idx(0, 5), idx(r, 5)) for r in range(1, 4))
    assert not torch.equal(idx(0, 5), idx(0, 6))
    assert not torch.equal(idx(0, 5), idx(0, 5, offset=1000))
    assert not torch.equal(idx(0, 5), idx(0, 5, seed=10))
    assert idx(0, 5).numel() == 30 + 8


def test_randomk_scaled_is_unbiased():
    """E[(d/k) x_S] = x: the unbiased Random-k (the EF form sends x_S unscaled)."""
    d, k, trials = 20, 4, 20_000
    x = torch.linspace(-1, 1, d)
    method = make_method("randomk", k=k)
    layout = Layout.for_sizes([d])
    acc = torch.zeros(d, dtype=torch.float64)
    for step in range(trials):
        idx = method.indices(StepContext(step=step, rank=0, size=1, bucket="b", offset=0,
                                         layout=layout))
        acc[idx] += (d / k) * x[idx].double()
    se = x.double().abs() * math.sqrt(d / k - 1) / math.sqrt(trials)
    assert ((acc / trials - x.double()).abs() <= 4 * se + 1e-9).all()


def test_randomk_sends_k_values_and_the_mean_lands_on_the_shared_positions():
    sim = Simulation("randomk", n_ranks=3, sizes=[100], k=7)
    grads = [torch.randn(sim.layout.numel) for _ in range(3)]
    update = sim.step(grads)
    assert [m.numel() for m in sim.last_messages] == [7 + 3] * 3     # values, 3 status slots
    assert not any(m[7:].any() for m in sim.last_messages)
    idx = sim.method.indices(ctx_for(sim, 0, 0))
    assert torch.allclose(update[idx], sum(g[idx] for g in grads) / 3)
    assert update.count_nonzero() == 7


def randomk_sum(method, ctxs, messages, scale=1.0):
    """What the allreduce gives: the sum, with Horovod's prescale and postscale."""
    total = sum(m * (1.0 / scale) for m in messages) * scale
    return method.aggregate(total, {}, ctxs[0])


@pytest.mark.parametrize("scale", [1.0, 3.0, 7.0])
def test_randomk_status_slots_name_the_rank_through_the_sum(scale):
    """Random-k's allreduce has no headers: a rank marks its own status slot, and every rank
    names it from the sum (predivide factors included); a joined rank adds nothing."""
    method = make_method("randomk", k=5)
    layout = Layout.for_sizes([50])
    ctxs = [StepContext(step=0, rank=r, size=4, bucket="b", offset=0, layout=layout, n_ranks=5)
            for r in range(5)]
    ok = [method.compress(torch.randn(layout.numel), c) for c in ctxs[:3]]
    joined = method.encode_joined(torch.zeros(layout.numel), ctxs[4])
    assert [m.numel() for m in ok + [joined]] == [5 + 5] * 4 and not joined.any()
    with pytest.raises(NonFiniteGradientError, match=r"rank\(s\) \[3\]"):
        randomk_sum(method, ctxs, ok + [method.encode_nonfinite(ctxs[3]), joined], scale)
    with pytest.raises(wire.SenderFailedError, match=r"rank\(s\) \[1, 3\]"):
        randomk_sum(method, ctxs, [ok[0], method.encode_failed(ctxs[1]), ok[2],
                                   method.encode_failed(ctxs[3]), joined], scale)
    update = randomk_sum(method, ctxs, ok + [joined, joined], scale)
    idx = method.indices(ctxs[0])
    assert torch.allclose(update[idx], sum(m[:5] for m in ok) / 4)


def test_randomk_a_rank_whose_own_values_overflow_is_named():
    """The engine checked g, but e + g can overflow on one rank: that rank marks its slot."""
    method = make_method("randomk", k=5)
    layout = Layout.for_sizes([50])
    ctxs = [StepContext(step=0, rank=r, size=2, bucket="b", offset=0, layout=layout)
            for r in range(2)]
    msgs = [method.compress(torch.randn(layout.numel), ctxs[0]),
            method.compress(torch.full((layout.numel,), math.inf), ctxs[1])]
    assert not msgs[1][:5].any() and msgs[1][5 + 1] == 1.0
    with pytest.raises(NonFiniteGradientError, match=r"rank\(s\) \[1\]"):
        randomk_sum(method, ctxs, msgs)


def test_randomk_payload_is_float32_whatever_the_default_dtype():
    method = make_method("randomk", k=5)
    layout = Layout.for_sizes([50])
    ctx = StepContext(step=0, rank=0, size=2, bucket="b", offset=0, layout=layout)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        msgs = [method.encode_joined(None, ctx), method.encode_failed(ctx),
                method.compress(torch.randn(layout.numel, dtype=torch.float32), ctx)]
    finally:
        torch.set_default_dtype(old)
    assert all(m.dtype == torch.float32 and m.numel() == 5 + 2 for m in msgs)


def test_randomk_finite_values_whose_sum_overflows_raise_without_a_name():
    method = make_method("randomk", k=5)
    layout = Layout.for_sizes([50])
    ctxs = [StepContext(step=0, rank=r, size=2, bucket="b", offset=0, layout=layout)
            for r in range(2)]
    big = [method.compress(torch.full((layout.numel,), 3e38), c) for c in ctxs]
    with pytest.raises(NonFiniteGradientError, match="overflowed"):
        randomk_sum(method, ctxs, big)


# --- non-finite gradients -------------------------------------------------------------------------

@pytest.mark.parametrize("method,options", [("topk", {}), ("threshold", {"lam": 0.1}),
                                            ("randomk", {}), ("ecx", {})])
def test_nonfinite_gradient_raises_on_every_rank_and_keeps_the_memory(method, options):
    sim = Simulation(method, n_ranks=2, sizes=[300], **options)
    sim.step([torch.randn(300), torch.randn(300)])
    before = [{k: v.clone() for k, v in st.items()} for st in sim.states]
    bad = torch.randn(300)
    bad[17] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"NaN or Inf .* rank\(s\) \[1\]"):
        sim.step([torch.randn(300), bad])
    for b, st in zip(before[1:], sim.states[1:]):
        assert all(torch.equal(b[k], st[k]) for k in b)


# --- perturbation and saddle escape (section 6) ---------------------------------------------------

def test_noise_has_the_documented_variance_and_streams():
    layout = Layout.for_sizes([40_000])
    rank_noise = make_method("topk", noise=2.0)
    shared = make_method("topk", noise=2.0, noise_seed="shared")

    def draw(method, rank, step=0):
        z = torch.zeros(layout.numel)
        method.add_noise(z, StepContext(step=step, rank=rank, size=2, bucket="b", offset=0,
                                        layout=layout))
        return z
    z = draw(rank_noise, 0)
    assert float(z.pow(2).sum()) == pytest.approx(4.0, rel=0.05)       # E||zeta||^2 = r^2
    assert not torch.equal(z, draw(rank_noise, 1))
    assert not torch.equal(z, draw(rank_noise, 0, step=1))
    assert torch.equal(draw(shared, 0), draw(shared, 1))


def test_reset_sends_the_memory_dense_and_zeroes_it():
    sim = Simulation("topk", n_ranks=1, sizes=[50], k=1, reset_every=3)
    for step in range(6):
        g = torch.randn(sim.layout.numel)
        before = sim.states[0]["error"] + g
        update = sim.step([g])
        if step in (2, 5):
            assert torch.equal(update, before) and not sim.states[0]["error"].any()
            assert sim.last_messages[0].numel() == 16 + 4 * sim.layout.numel
        else:
            assert update.count_nonzero() == 1


def saddle(method, noise, steps=1000, lr=0.1):
    """f(x, y) = x^2/2 + y^4/4 - y^2/2 from (1, 0); 2 ranks, EF with k = 1 of d = 2."""
    sim = Simulation(method, n_ranks=2, sizes=[2], seed=5, k=1, noise=noise)
    z = torch.tensor([1.0, 0.0])
    for _ in range(steps):
        g = torch.stack([z[0], z[1] ** 3 - z[1]])
        z = z - lr * sim.step([g, g.clone()])[:2]
    return z, float(0.5 * z[0] ** 2 + 0.25 * z[1] ** 4 - 0.5 * z[1] ** 2)


@pytest.mark.parametrize("method", ["topk", "randomk"])
def test_saddle_without_noise_stays_and_with_noise_escapes(method):
    z, f = saddle(method, noise=0.0)
    assert float(z.abs().max()) < 1e-6 and f == pytest.approx(0.0, abs=1e-9)
    z, f = saddle(method, noise=0.01)
    assert abs(abs(float(z[1])) - 1) < 0.01 and f < -0.2499


# --- ErrorCompensatedX (section 7) ----------------------------------------------------------------

def test_ecx_identity_momentum_error_is_alpha_times_delta_difference():
    """Section 7(a): v_compressed - v_exact == alpha (delta_{t-1} - delta_t) (mean over ranks),
    2000 random steps, scaled sign, alpha = 0.1. float32 state: holds to float32 rounding."""
    torch.manual_seed(0)
    alpha, d = 0.1, 64
    sim = Simulation("ecx", n_ranks=2, sizes=[d], alpha=alpha)
    v_c = torch.zeros(d, dtype=torch.float64)
    v = torch.zeros(d, dtype=torch.float64)
    prev = torch.zeros(d, dtype=torch.float64)
    worst = 0.0
    for _ in range(2000):
        grads = [torch.randn(d) * 3 for _ in range(2)]
        v_c = (1 - alpha) * v_c + alpha * sim.step(grads)[:d].double()
        v = (1 - alpha) * v + alpha * (grads[0].double() + grads[1].double()) / 2
        delta = (sim.states[0]["delta1"].double() + sim.states[1]["delta1"].double()) / 2
        worst = max(worst, float((v_c - v - alpha * (prev - delta)).abs().max()))
        prev = delta
    assert worst < 1e-5, worst


def ecx_quadratic(gamma, compensation, steps=3000, compressor="scaled_sign", **options):
    """Section 7(b): d = 100, h = linspace(0.1, 10), x0 = 1, 4 ranks, noise N(0, 1), momentum
    form with alpha = 0.05, seed 0; returns the mean f over the last 500 steps (the last quarter
    for short runs; inf when the run blows up)."""
    torch.manual_seed(0)
    d, alpha = 100, 0.05
    h = torch.linspace(0.1, 10, d)
    x, v = torch.ones(d), torch.zeros(d)
    if compensation == "exact":
        sim = Simulation("none", n_ranks=4, sizes=[d])
    else:
        sim = Simulation("ecx", n_ranks=4, sizes=[d], alpha=alpha, compensation=compensation,
                         compressor=compressor, **options)
    tail = []
    for k in range(steps):
        v = (1 - alpha) * v + alpha * sim.step([h * x + torch.randn(d) for _ in range(4)])[:d]
        x = x - gamma * v
        f = 0.5 * float((h * x * x).sum())
        if not f < 1e12:
            return math.inf
        if k >= steps - min(500, steps // 4):
            tail.append(f)
    return sum(tail) / len(tail)


def test_ecx_quadratic_at_the_larger_step_single_step_ec_diverges():
    """ALGORITHMS.md: exact 0.120, ECX 0.123, single-step EC ~1e20, none 0.134 (final f).
    Measured here (mean of the last 500 steps): exact 0.129, ECX 0.130, none 0.131, single inf.
    The ECX-none gap at this step size is within the noise (other seeds reverse it), so only
    ECX ~ exact and the divergence of single-step EC are asserted."""
    exact = ecx_quadratic(0.02, "exact")
    ecx = ecx_quadratic(0.02, "ecx")
    assert ecx < 1.05 * exact, (ecx, exact)
    assert ecx_quadratic(0.02, "single") == math.inf


def test_ecx_quadratic_at_the_smaller_step_no_compensation_lags():
    """ALGORITHMS.md: exact = ECX = single 0.032, none 0.046. Measured: exact 0.0365,
    ECX 0.0366, single 0.0371, none 0.0398."""
    exact = ecx_quadratic(0.005, "exact")
    ecx = ecx_quadratic(0.005, "ecx")
    single = ecx_quadratic(0.005, "single")
    none = ecx_quadratic(0.005, "none")
    assert ecx < 1.03 * exact and single < 1.05 * exact, (exact, ecx, single)
    assert none > 1.05 * ecx, (none, ecx)


def test_ecx_with_topk_diverges_which_is_why_it_is_refused():
    """The section 7 failure mode, with the project's Top-k codec: ECX + Top-k 10% blows up
    within 400 steps (f > 1e12; it passes 1e9 by step 100) where single-step EF + Top-k
    (= method topk) converges (f from 252 to about 0.4)."""
    opts = {"compressor": "topk", "ratio": 0.1, "_allow_sparse": True}
    assert ecx_quadratic(0.005, "ecx", steps=400, **opts) == math.inf
    assert ecx_quadratic(0.005, "single", steps=400, **opts) < 1.0
    for compressor in ("topk", "threshold", "randomk"):
        with pytest.raises(ValueError, match=f"compressor='{compressor}' is refused"):
            make_method("ecx", compressor=compressor)


def test_ecx_none_and_single_keep_the_documented_state():
    layout = Layout.for_sizes([10])
    assert make_method("ecx", compensation="none").init_state(layout) == {}
    assert set(make_method("ecx", compensation="single").init_state(layout)) == {"delta1"}
    assert set(make_method("ecx").init_state(layout)) == {"delta1", "delta2"}


def test_storm_direction():
    g, gp = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    assert torch.allclose(storm_direction(g, gp, 0.1), g + 9.0 * (g - gp))


def storm_quadratic(compensation, steps=1500, gamma=0.005, alpha=0.05):
    """STORM on the section 7(b) quadratic: each rank evaluates its gradient at x_t and x_{t-1}
    on the same noise sample; mean f over the last 500 steps."""
    torch.manual_seed(0)
    d = 100
    h = torch.linspace(0.1, 10, d)
    x, x_prev, v = torch.ones(d), torch.ones(d), torch.zeros(d)
    sim = (Simulation("none", n_ranks=4, sizes=[d]) if compensation == "exact" else
           Simulation("ecx", n_ranks=4, sizes=[d], alpha=alpha, compensation=compensation))
    tail = []
    for k in range(steps):
        xi = [torch.randn(d) for _ in range(4)]
        u = [storm_direction(h * x + z, h * x_prev + z, alpha) for z in xi]
        v = (1 - alpha) * v + alpha * sim.step(u)[:d]
        x_prev, x = x, x - gamma * v
        if k >= steps - 500:
            tail.append(0.5 * float((h * x * x).sum()))
    return sum(tail) / len(tail)


def test_storm_with_ecx_tracks_exact_storm():
    """STORM as the ECX base method (u_t = storm_direction(...)): the compensated run stays
    within 3% of uncompressed STORM; without compensation it is worse. Measured: exact 0.0616,
    ECX 0.0617, single-step 0.0618, none 0.0939."""
    exact, ecx = storm_quadratic("exact"), storm_quadratic("ecx")
    assert abs(ecx / exact - 1) < 0.03, (exact, ecx)
    assert storm_quadratic("none") > 1.05 * ecx


# --- options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options,match", [
    ("topk", {"ratio": 0.0}, "ratio"), ("topk", {"scope": "model"}, "scope"),
    ("topk", {"values": "bf16"}, "values"), ("topk", {"k": 0}, "k must"),
    ("threshold", {"lam": -1.0}, "lam"), ("threshold", {"max_density": 0.0}, "max_density"),
    ("randomk", {"ratio": 2.0}, "ratio"), ("randomk", {"noise": -1.0}, "noise"),
    ("randomk", {"noise_seed": "x"}, "noise_seed"), ("topk", {"reset_every": 1.5}, "reset"),
    ("ecx", {"alpha": 0.0}, "alpha"), ("ecx", {"compensation": "two"}, "compensation"),
    ("topk", {"bogus": 1}, "bad options"),
])
def test_bad_options_raise_value_error(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_method(name, **options)


def test_describe_names_the_options():
    assert make_method("topk").describe() == "topk(ratio=0.01, scope=layer, values=fp32)"
    assert make_method("threshold", lam=0.1).describe() == \
        "threshold(lam=0.1, max_density=0.5, values=fp32)"
    assert make_method("randomk", k=3, noise=0.1).describe() == \
        "randomk(k=3, noise=0.1, noise_seed=rank, reset_every=0)"
    assert make_method("ecx").describe() == \
        "ecx(alpha=0.1, compensation=ecx, compressor=scaled_sign)"
