"""ties="owner" for the majority vote: a tied element takes the sign its shard's owner sent
(rank j owns shard j of wire.shard_elements), 0 where the owner sent 0. Checked on the
allgather path against a plain-Python vote; the sharded path is checked against this one in
tests/multirank/test_exchange.py."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvd_signsgd import wire
from hvd_signsgd.methods import make_method
from hvd_signsgd.simulate import Simulation

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def reference(grads, ties):
    """sign(sum_m sign(g_m)) with sign(0) = 0; a 0 sum broken by the shard owner's sign."""
    signs = torch.stack([torch.sign(g) for g in grads])
    vote = torch.sign(signs.sum(0))
    if ties == "owner":
        for j, (e0, k) in enumerate(wire.shard_elements(vote.numel(), len(grads))):
            seg = vote[e0:e0 + k]
            seg.copy_(torch.where(seg == 0, signs[j, e0:e0 + k], seg))
    return vote


def gradients(n, d, zero_rate, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(d, generator=g)
        x[x == 0] = 1.0
        x[torch.rand(d, generator=g) < zero_rate] = 0.0
        out.append(x)
    return out


@SETTINGS
@given(n=st.integers(1, 6), d=st.sampled_from([1, 7, 31, 33, 255, 257, 1000, 4099]),
       zero_rate=st.sampled_from([0.0, 0.01, 0.3, 1.0]), seed=st.integers(0, 2 ** 16),
       method=st.sampled_from(["signsgd", "signum"]))
def test_owner_breaks_ties_with_its_own_sign(n, d, zero_rate, seed, method):
    grads = gradients(n, d, zero_rate, seed)
    for ties in ("zero", "owner"):
        opts = {"beta": 0.0} if method == "signum" else {}
        sim = Simulation(method, n_ranks=n, sizes=[d], ties=ties, **opts)
        got = sim.step([g.clone() for g in grads])
        assert torch.equal(got, reference(grads, ties)), ties


def test_owner_leaves_no_tie_without_zeros_and_changes_nothing_at_odd_n():
    for n in (2, 3, 4, 5):
        grads = gradients(n, 5000, 0.0, n)
        owner = Simulation("signsgd", n_ranks=n, sizes=[5000], ties="owner").step(grads)
        zero = Simulation("signsgd", n_ranks=n, sizes=[5000]).step(grads)
        assert int((owner == 0).sum()) == 0
        if n % 2:
            assert torch.equal(owner, zero)
        else:
            assert int((zero == 0).sum()) > 0


def test_bad_ties_options_raise():
    with pytest.raises(ValueError, match="ties must be one of"):
        make_method("signsgd", ties="random")
    with pytest.raises(ValueError, match="majority"):
        make_method("signsgd", aggregation="mean", ties="owner")
    with pytest.raises(ValueError, match="majority"):
        make_method("ssdm", ties="owner")            # ssdm's default aggregation is the mean
    assert make_method("ssdm", aggregation="majority", ties="owner").ties == "owner"
    assert make_method("stochastic_sign", ties="owner").options()["ties"] == "owner"


def test_owner_ties_on_an_empty_bucket():
    got = Simulation("signsgd", n_ranks=2, sizes=[0], ties="owner").step(
        [torch.zeros(0), torch.zeros(0)])
    assert got.numel() == 0
