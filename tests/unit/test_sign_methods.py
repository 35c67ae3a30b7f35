"""ALGORITHMS.md sections 1-4 with the real codecs, kernels and aggregation rules, n virtual ranks
in one process (hvd_signsgd.simulate). The same code runs under MPI in tests/multirank."""
import math

import pytest
import torch

from hvd_signsgd import kernels, wire
from hvd_signsgd.codecs import Layout, ScaledSign
from hvd_signsgd.simulate import Simulation


def quadratic(h, x):
    return 0.5 * float((h * x * x).sum())


# --- section 1: signGD on a deterministic quadratic ---------------------------------------------

def test_signgd_decaying_step_converges():
    h = torch.linspace(0.5, 2, 50)
    x = torch.linspace(-1.3, 0.987, 50)
    sim = Simulation("signsgd", n_ranks=1, sizes=[50])
    for k in range(20000):
        x -= 0.1 / math.sqrt(k + 1) * sim.step([h * x])[:50]
    assert x.abs().max() < 1e-3


def test_signgd_constant_step_oscillates_within_band():
    h = torch.linspace(0.5, 2, 50)
    x = torch.linspace(-1.3, 0.987, 50)
    sim = Simulation("signsgd", n_ranks=1, sizes=[50])
    for _ in range(200):
        x -= 0.01 * sim.step([h * x])[:50]
    assert (x.abs() <= 0.01 + 1e-6).all()


# --- section 2: majority vote tolerates a minority of sign-flipping ranks ----------------------

def _vote_run(n_bad, method="signsgd", bad_scale=-1.0, steps=2000):
    torch.manual_seed(0)
    h = torch.linspace(0.5, 2, 50)
    x = torch.ones(50)
    sim = Simulation(method, n_ranks=5, sizes=[50])
    for _ in range(steps):
        grads = [h * x + torch.randn(50) for _ in range(5)]
        for r in range(n_bad):
            grads[r] = bad_scale * grads[r]
        x -= 0.005 * sim.step(grads)[:50]
        if not torch.isfinite(x).all():
            return float("inf")
    return quadratic(h, x)


def test_majority_vote_fault_tolerance():
    f = [_vote_run(b) for b in range(4)]
    # ALGORITHMS.md: 0.03, 0.07, 0.19 for 0, 1, 2 adversaries; growth (~3.5e3) with 3 of 5.
    assert f[0] < 0.1 and f[1] < 0.2 and f[2] < 0.5, f
    assert f[0] < f[1] < f[2]
    assert f[3] > 10 * 31.25, f   # grows far past the start value f(x0) = 31.25


def test_mean_aggregation_breaks_with_one_adversary():
    assert _vote_run(0, method="none") < 0.1
    assert _vote_run(1, method="none", bad_scale=-10.0) > 1e3


# --- section 3: stochastic sign, heterogeneity, SSDM --------------------------------------------

def test_stochastic_sign_is_unbiased_up_to_norm():
    g = torch.tensor([0.3, -0.1, 0.0, 0.5, -0.8])
    draws = 200_000
    x = g.repeat(draws)   # the stream depends on the element index: independent draws
    signs = kernels.unpack_signs(kernels.pack_stochastic_signs(x, float(g.norm()), seed=7),
                                 x.numel())
    mean = signs.view(draws, 5).mean(0)
    target = g / g.norm()
    se = torch.sqrt((1 - target**2) / draws)
    assert ((mean - target).abs() <= 3 * se + 1e-9).all(), (mean, target)


@pytest.mark.parametrize("method,options", [
    ("signsgd", {}), ("signsgd", {"aggregation": "mean"}), ("ssdm", {"beta": 0.0}),
])
def test_heterogeneous_1d_instance_defeats_sign_methods(method, options):
    # f1 = f2 = (x-1)^2/2, f3 = 5(x+1)^2: the minimiser of the average is -2/3, yet two of three
    # signs say "increase" everywhere in (-1, 1), so every rule built on local signs goes to 1.
    sim = Simulation(method, n_ranks=3, sizes=[1], **options)
    x = torch.zeros(1)
    for _ in range(1000):
        x -= 0.01 * sim.step([x - 1, x - 1, 10 * (x + 1)])[:1]
    assert abs(float(x) - 1.0) < 0.03


@pytest.mark.parametrize("method,options", [
    ("none", {}), ("ssdm", {"beta": 0.0, "aggregation": "norm_weighted"}),
])
def test_heterogeneous_1d_instance_full_precision_finds_minimiser(method, options):
    # norm-weighted SSDM sends norm_m * s~(v_m), whose mean is the mean momentum: in 1-D that
    # is exactly the full-precision average, so it finds -2/3 too.
    sim = Simulation(method, n_ranks=3, sizes=[1], **options)
    x = torch.zeros(1)
    for _ in range(2000):
        x -= 0.05 * sim.step([x - 1, x - 1, 10 * (x + 1)])[:1]
    assert abs(float(x) + 2 / 3) < 1e-4


def _ssdm_quadratic(centres, steps=20000, **options):
    torch.manual_seed(0)
    d, n = 20, len(centres)
    x = torch.zeros(d)
    options = {"norm_type": "l2", **options}     # ALGORITHMS.md 3.5(b) uses the l2 operator
    sim = Simulation("ssdm", n_ranks=n, sizes=[d], beta="schedule", seed=3, **options)
    for k in range(steps):
        grads = [x - c + torch.randn(d) for c in centres]
        x -= 0.5 / (k + 1) ** 0.75 * sim.step(grads)[:d]
    return x


def test_ssdm_converges_on_homogeneous_shards():
    x = _ssdm_quadratic([1.0] * 4)
    assert float((x - 1).norm()) < 0.15   # ALGORITHMS.md: about 0.04


def test_ssdm_stalls_on_heterogeneous_shards():
    x = _ssdm_quadratic([3.0, -1.0, -1.0, -1.0])
    assert float(x.norm()) > 3.0          # ALGORITHMS.md: about 4.4, near the median -1


def test_ssdm_variants_on_heterogeneous_shards():
    """Which SSDM aggregation survives heterogeneous shards (documented in the README): the
    vote stalls like the mean, near the median; the norm-weighted mean, unbiased for the mean
    momentum, converges to the optimum 0 of the average objective."""
    centres = [3.0, -1.0, -1.0, -1.0]
    vote = _ssdm_quadratic(centres, steps=5000, aggregation="majority")
    weighted = _ssdm_quadratic(centres, steps=5000, aggregation="norm_weighted")
    assert float(vote.norm()) > 3.0
    assert float(weighted.norm()) < 0.5


# --- section 4: EF-signSGD ------------------------------------------------------------------------

def _ef_counterexample(method, lr_fn, steps=20000):
    eps = 0.5
    a = [torch.tensor([1.0, -1.0 + eps]), torch.tensor([-1.0, 1.0 + eps])]
    gen = torch.Generator().manual_seed(1)
    x = torch.tensor([1.0, 1.0])
    sim = Simulation(method, n_ranks=1, sizes=[2])
    for k in range(steps):
        ai = a[int(torch.randint(2, (1,), generator=gen))]
        x -= lr_fn(k) * sim.step([2 * (ai @ x) * ai])[:2]
    return x, float((a[0] @ x) ** 2 + (a[1] @ x) ** 2)


def test_signsgd_counterexample_never_converges():
    x, f = _ef_counterexample("signsgd", lambda k: 0.05 / math.sqrt(k + 1))
    assert abs(float(x.sum()) - 2.0) < 1e-5   # every sign is +-(1, -1): x1 + x2 is frozen
    assert f > 0.3                            # ALGORITHMS.md: about 0.47


def test_ef_signsgd_counterexample_converges():
    _, f = _ef_counterexample("ef_signsgd", lambda k: 0.05)
    _, f_sgd = _ef_counterexample("none", lambda k: 0.05)
    # float32 state: the paper's f < 1e-100 underflows; this is as close to 0 as float32 gets
    assert f < 1e-20 and f_sgd < 1e-20, (f, f_sgd)


def test_ef_conservation_invariant_per_rank():
    """sum_t q_t + e_T == sum_t g_t on every rank (gradient units, lr applied outside)."""
    torch.manual_seed(0)
    sizes = [37, 1, 130]
    sim = Simulation("ef_signsgd", n_ranks=3, sizes=sizes)
    layout = sim.layout
    sent = [torch.zeros(layout.numel, dtype=torch.float64) for _ in range(3)]
    total = [torch.zeros(layout.numel, dtype=torch.float64) for _ in range(3)]
    codec = ScaledSign()
    for _ in range(300):
        grads = [sim.flatten([torch.randn(s) * (1 + t) for t, s in enumerate(sizes)])
                 for _ in range(3)]
        sim.step(grads)
        for r in range(3):
            payload = wire.split(sim.last_messages[r], 1, bucket="t", codec="scaled_sign",
                                 n=layout.numel)[0]
            sent[r] += codec.decode(payload, layout).double()
            total[r] += grads[r].double()
    for r in range(3):
        err = sim.states[r]["error"].double()
        assert torch.allclose(sent[r] + err, total[r], atol=1e-3), r


def test_ef_signsgd_scales_are_per_tensor():
    layout = Layout.for_sizes([3, 5])
    x = torch.zeros(layout.numel)
    x[0:3] = torch.tensor([1.0, -2.0, 3.0])
    x[8:13] = torch.tensor([0.5, 0.5, -0.5, 0.5, 0.5])
    assert ScaledSign.scales(x, layout).tolist() == [2.0, 0.5]


def test_all_finite_is_exact_even_when_the_sum_overflows():
    all_finite = kernels.all_finite
    big = torch.full((4,), 3e38)               # finite, but the sum overflows to inf
    assert all_finite(big)
    assert all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1000)
        x[517] = bad
        assert not all_finite(x)
    x = torch.full((4,), 3e38)
    x[2] = float("inf")
    assert not all_finite(x)


def test_scaled_sign_subtract_local_equals_p_minus_its_decoding():
    """The in-place error-feedback residual is bit-identical to p - decompress_local(p),
    signed zeros included (zeros, +0 and -0, decode to 0: sign(0) = 0)."""
    layout = Layout.for_sizes([13, 1, 40])
    x = torch.randn(layout.numel)
    x[[0, 16, 30]] = torch.tensor([0.0, -0.0, -0.0])
    for o, s in layout.segments():        # the gaps stay 0
        x[o + s:(o + s + 7) // 8 * 8] = 0
    scales = ScaledSign.scales(x, layout)
    want = x - ScaledSign.decompress_local(x, scales, layout)
    got = x.clone()
    ScaledSign.subtract_local(got, scales, layout)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
