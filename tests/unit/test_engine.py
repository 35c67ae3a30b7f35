"""The engine on the one-rank communicator (no library underneath): the step protocol, the
non-finite policy, warm-up scaling and checkpoint sections, in one process."""
import math

import pytest
import torch

from hvd_signsgd.communicator import Communicator
from hvd_signsgd.engine import Engine
from hvd_signsgd.methods import NonFiniteGradientError, StepContext, make_method


def engine_for(method, sizes=(40, 13), options=None, **kw):
    eng = Engine(Communicator(), make_method(method, **(options or {})), **kw)
    eng.build([([f"t{i}" for i in range(len(sizes))], list(sizes), None)])
    return eng


def run_step(eng, grads):
    (b,) = eng.buckets
    eng.begin_step()
    for (o, s), g in zip(b.layout.segments(), grads):
        b.flat[o:o + s] = g
    eng.launch([b])
    return eng.finish(), b


def test_one_rank_signum_sends_the_sign_of_its_momentum():
    eng = engine_for("signum", options={"beta": 0.5})
    g1 = [torch.randn(40), torch.randn(13)]
    g2 = [torch.randn(40), torch.randn(13)]
    run_step(eng, g1)
    outcome, b = run_step(eng, g2)
    assert not outcome.skipped and outcome.error is None
    v = [0.5 * (0.5 * a) + 0.5 * c for a, c in zip(g1, g2)]
    want = torch.cat([torch.sign(v[0]), torch.zeros(0), torch.sign(v[1])])
    got = torch.cat([b.flat[o:o + s] for o, s in b.layout.segments()])
    assert torch.equal(got, want)
    assert eng.step == 2 and eng.stats()["bytes_sent"] > 0


def test_nonfinite_restores_the_state_and_raises_or_skips():
    for policy in ("raise", "skip"):
        eng = engine_for("ef_signsgd", on_nonfinite=policy)
        run_step(eng, [torch.randn(40), torch.randn(13)])
        before = eng.buckets[0].state["error"].clone()
        bad = torch.randn(40)
        bad[3] = math.inf
        outcome, b = run_step(eng, [bad, torch.randn(13)])
        assert torch.equal(b.state["error"], before)
        assert eng.step == 1
        if policy == "raise":
            assert isinstance(outcome.error, NonFiniteGradientError)
        else:
            assert outcome.skipped and torch.isnan(b.flat).all()
            assert eng.stats()["total_skipped_steps"] == 1


def test_warmup_update_is_scaled_to_the_size_of_a_vote():
    eng = engine_for("signsgd", start_step=1)
    g = [torch.randn(40) * 1e-3, torch.randn(13) * 5.0]
    _, b = run_step(eng, g)
    for (o, s), gt in zip(b.layout.segments(), g):
        seg = b.flat[o:o + s]
        assert abs(float(seg.abs().mean()) - 1.0) < 1e-5        # a vote moves by 1 per coord
        assert torch.equal(torch.sign(seg), torch.sign(gt))       # the direction is the mean's
    eng2 = engine_for("ef_signsgd", start_step=1)                 # gradient units: unchanged
    _, b2 = run_step(eng2, g)
    assert torch.equal(b2.flat[:40], g[0])


def test_ssdm_schedule_starts_with_compression():
    m = make_method("ssdm", beta="schedule")
    layout = engine_for("ssdm").buckets[0].layout
    state = m.init_state(layout)
    state["momentum"].fill_(7.0)
    g = torch.randn(layout.numel)
    ctx = StepContext(step=10, rank=0, size=1, bucket="b", offset=0, layout=layout,
                      method_step=0)
    m.prepare(g, state, ctx)          # beta_0 = 0: the momentum is the gradient
    assert torch.equal(state["momentum"], g)


def test_load_section_problems_are_reported_at_the_next_step():
    eng = engine_for("ef_signsgd")
    run_step(eng, [torch.randn(40), torch.randn(13)])
    section = eng.state_section()
    other = engine_for("ef_signsgd")
    other.load_section(dict(section, rank=1))
    with pytest.raises(ValueError, match="saved by rank 1"):
        run_step(other, [torch.randn(40), torch.randn(13)])
    good = engine_for("ef_signsgd")
    good.load_section(section)
    assert torch.equal(good.buckets[0].state["error"], eng.buckets[0].state["error"])
    run_step(good, [torch.randn(40), torch.randn(13)])
    assert good.step == 2


def test_a_step_that_fails_part_way_restores_only_the_launched_buckets():
    """drain() after launching bucket 0 of two: bucket 1 was not launched this step, so its
    backup is the state before the last step, and restoring it would undo that step."""
    eng = Engine(Communicator(), make_method("signum", beta=0.5))
    eng.build([(["a"], [40], None), (["b"], [13], None)])
    for _ in range(2):
        eng.begin_step()
        for b in eng.buckets:
            b.flat.copy_(torch.randn(b.layout.numel))
        eng.launch(eng.buckets)
        assert eng.finish().error is None
    before = [b.state["momentum"].clone() for b in eng.buckets]
    eng.begin_step()
    eng.buckets[0].flat.copy_(torch.randn(40))
    eng.launch([eng.buckets[0]])          # then the step fails before bucket 1 leaves
    assert not torch.equal(eng.buckets[0].state["momentum"], before[0])
    eng.drain()
    for b, m in zip(eng.buckets, before):
        assert torch.equal(b.state["momentum"], m), b.name
    assert eng.step == 2


def test_a_method_that_raises_is_reported_by_encode_failed_or_raised_at_once():
    """The engine sends encode_failed's payload in place of the payload of a method that
    raised, and raises the method's error once the step's collectives are done (finish).
    Where nothing can be sent instead (the dense baselines, or an encode_failed that raises
    too), the method's error comes at once, from launch."""
    from hvd_signsgd.methods import NoCompression
    from hvd_signsgd.methods.sparse import RandomK

    class Boom(RandomK):
        def encode(self, g, state, ctx):
            raise ValueError("boom")

    class BoomTwice(Boom):
        def encode_failed(self, ctx):
            raise RuntimeError("again")

    class DenseBoom(NoCompression):
        def encode(self, g, state, ctx):
            raise ValueError("boom")

    assert Boom().reports_failures and make_method("signsgd").reports_failures
    assert not DenseBoom().reports_failures and not make_method("fp16").reports_failures

    def launched(method):
        eng = Engine(Communicator(), method)
        eng.build([(["a", "b"], [40, 13], None)])
        (b,) = eng.buckets
        eng.begin_step()
        b.flat.copy_(torch.randn(b.layout.numel))
        eng.launch([b])
        return eng

    eng = launched(Boom(ratio=0.5))
    with pytest.raises(ValueError, match="boom"):
        eng.finish()
    for method in (BoomTwice(ratio=0.5), DenseBoom()):
        with pytest.raises(ValueError, match="boom"):
            launched(method)

