"""scaling_report.py's model: the tie fraction of the sharded vote, the per-exchange fit (which
must recover known constants from points made by the model itself) and the targets."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "netsim"))

import scaling_report as sr  # noqa: E402


def test_tie_fraction_and_planes():
    assert sr.tie_fraction(2) == pytest.approx(0.5)
    assert sr.tie_fraction(4) == pytest.approx(6 / 16)
    assert sr.tie_fraction(16) == pytest.approx(math.comb(16, 8) / 2**16)
    assert sr.tie_fraction(9) == 0.0
    assert sr.sharded_down_planes(9) == 1.0
    assert sr.sharded_down_planes(16) == 2.0          # ties 19.6% > 1/32: a whole plane
    # at 1024 ranks 2.5% tie: int32 offsets (32 bits each) are cheaper than the plane
    assert sr.sharded_down_planes(1024) == pytest.approx(1 + 32 * sr.tie_fraction(1024))
    assert sr.sharded_down_planes(1024) < 2.0


def point(ex, n, t, d=1000, cpu=0.0, tx=None):
    p = {"exchange": ex, "ranks": n, "slots": 1, "hosts": n, "d": d, "rate": "100mbit",
         "time": t, "time_min": t, "time_max": t, "steps": 3, "cpu": cpu, "lib_wire": None}
    if tx is not None:
        p["iface_tx"] = p["iface_tx_net"] = tx
    return p


@pytest.mark.parametrize("ex", ["hvd_fp32", "allgather", "alltoall"])
def test_fit_recovers_the_constants(ex):
    alpha, beta, c, d = 2e-3, 9e-8, 0.05, 25_000_000
    spec = sr.EXCHANGES[ex]
    cpu = c if ex != "hvd_fp32" else 0.0
    pts = [point(ex, n, cpu + alpha * spec["latency"](n, 1) + beta * spec["bytes"](n, d, 1),
                 d=d, cpu=cpu) for n in (2, 4, 8, 16)]
    f = sr.fit(pts)[ex]
    assert f["c_s"] == cpu
    assert max(abs(r) for r in f["relative_residuals"]) < 1e-9
    if ex == "allgather":
        # L(n) = n - 1 and B(n) = (n - 1) d/8: one model size cannot tell alpha from beta;
        # the fit gives the whole slope to beta (the report says so)
        assert f["alpha_s"] == 0.0
        assert f["beta_s_per_byte"] == pytest.approx(beta + alpha * 8 / d, rel=1e-6)
        return
    assert f["alpha_s"] == pytest.approx(alpha, rel=1e-6)
    assert f["beta_s_per_byte"] == pytest.approx(beta, rel=1e-6)
    # at 10x the rate the byte term is 10x smaller, the rest unchanged
    n = 256
    want = cpu + alpha * spec["latency"](n, 1) + beta / 10 * spec["bytes"](n, d, 1)
    assert sr.predict(f, ex, n, 1e9) == pytest.approx(want, rel=1e-9)
    assert sr.predict(f, ex, n, 1e9, latency=False) == pytest.approx(
        want - alpha * spec["latency"](n, 1), rel=1e-9)


def test_targets_use_the_issue_formula_and_the_speed_ratios():
    d = 8_000_000
    ok_bytes = 2 * 15 / 16 * d / 8 + 16 * 2 * 15
    pts = [point("alltoall", 16, 1.0, d=d, tx=ok_bytes * 1.04),
           point("hvd_fp32", 16, 12.5, d=d), point("allgather", 16, 1.9, d=d),
           point("alltoall", 8, 1.0, d=d, tx=2 * 7 / 8 * d / 8 * 1.06),
           point("hvd_fp32", 8, 11.0, d=d)]
    got = {t: ok for t, ok, _ in sr.targets(pts)}
    assert list(got.values()) == [False, False, True, False]   # 8 hosts: 6% over, 11x
    pts[3]["iface_tx"] = 2 * 7 / 8 * d / 8
    pts[4]["time"] = 12.0
    assert [ok for _, ok, _ in sr.targets(pts)] == [True, True, True, False]   # 1.9x < 2
    # the bytes are judged on all the interface sent, not on the estimate less the control
    # traffic measured idle (which over-subtracts while the ranks are busy)
    pts[0]["iface_tx_net"] = ok_bytes * 0.9
    assert sr.targets(pts)[0][1] is True
    pts[0]["iface_tx"] = ok_bytes * 0.94
    assert sr.targets(pts)[0][1] is False
