"""Zero marks (issue 11): sign(0) = 0 on the wire, in the codecs' aggregates and in the sign
methods. A coordinate that is exactly 0 (+0 or -0) on a rank does not vote; vectors without
zeros are encoded byte for byte as before."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvd_signsgd import kernels, wire
from hvd_signsgd.codecs import Layout, ScaledSign, Sign, StochasticSign, count_zeros
from hvd_signsgd.simulate import Simulation

LENGTHS = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
           1023, 1024, 1025, 4095, 4096, 4097]
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def r4(n):
    return (n + 3) // 4 * 4


def expected_nbytes(n, z, n_scales=0):
    """The documented formula, written out independently of wire.py."""
    b = (n + 7) // 8
    if z == 0:
        body = b
    elif z == n:
        body = 0
    elif 4 * z < b:
        body = r4(b) + 4 * z
    else:
        body = r4(b) + b
    return wire.HEADER_NBYTES + 4 * n_scales + r4(body)


def with_zeros(n, zeros, seed=0, negative_zero=True):
    """Gaussian vector of n values with `zeros` exact zeros (+0 and -0 alternating)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[x == 0] = 1.0
    where = torch.randperm(n, generator=g)[:zeros]
    x[where] = 0.0
    if negative_zero:
        x[where[::2]] = -0.0
    return x


def float_signs(x):
    """sign with sign(0) = 0 (for +0 and -0), as float32."""
    return torch.where(x == 0, torch.zeros_like(x), torch.where(x < 0, -1.0, 1.0))


def split1(msg, codec, n):
    return wire.split(msg, 1, bucket="t", codec=codec, n=n)[0]


# ---- wire: round trips and lengths --------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
def test_sign_round_trip_and_length(n):
    b = (n + 7) // 8
    counts = sorted({0, min(1, n), min(2, n), max(0, (b - 1) // 4), b // 4, (b + 3) // 4,
                     n // 2, n})
    for z in counts:
        x = with_zeros(n, z, seed=n + z)
        msg = Sign().encode(x)
        assert msg.numel() == expected_nbytes(n, z), (n, z)
        assert msg.numel() == wire.payload_nbytes("sign", n, nnz=z, flags=wire.FLAG_ZEROS)
        p = split1(msg, "sign", n)
        assert p.header.nnz == z
        form = p.header.zero_form()
        assert form == (None if z == 0 else "all" if z == n else
                        "list" if 4 * z < b else "plane"), (n, z, form)
        assert torch.equal(Sign().decode(p, n), float_signs(x))
        if form == "list":
            assert torch.equal(p.zeros.long(), torch.nonzero(x == 0).reshape(-1))
        if form == "plane":
            assert torch.equal(kernels.unpack_bits(p.zeros, n), x == 0)
        if form is None:
            assert p.header.flags == 0 and p.zeros is None


@pytest.mark.parametrize("n", [1, 8, 9, 100, 1025])
def test_positive_and_negative_zero_are_both_marked(n):
    for value in (0.0, -0.0):
        x = torch.randn(n)
        x[n // 2] = value
        p = split1(Sign().encode(x), "sign", n)
        assert p.header.nnz == 1
        assert Sign().decode(p, n)[n // 2].item() == 0.0


def test_dense_vectors_are_byte_for_byte_the_old_format():
    layout = Layout.for_sizes([5, 3, 17])          # gaps of 3 and 5 elements hold zeros
    x = torch.randn(layout.numel)
    for o, s in layout.segments():
        x[o + s:(o + s + 7) // 8 * 8] = 0.0
    old = wire.build(wire.Header("sign", layout.numel), body=kernels.pack_signs(x))
    assert torch.equal(Sign().encode(x, layout=layout), old)
    scales = ScaledSign.scales(x, layout)
    old = wire.build(wire.Header("scaled_sign", layout.numel, n_scales=3), scales=scales,
                     body=kernels.pack_signs(x))
    assert torch.equal(ScaledSign().encode(x, layout, scales), old)
    bits = kernels.pack_stochastic_signs(x, 2.0, 7, 3)
    old = wire.build(wire.Header("stochastic_sign", layout.numel, n_scales=1),
                     scales=torch.tensor([2.0]), body=bits)
    assert torch.equal(StochasticSign().encode(x, 2.0, 7, 3, send_norm=True, layout=layout), old)
    for n in LENGTHS:
        assert Sign().encode(torch.randn(n) + 10).numel() == expected_nbytes(n, 0)


def test_gap_zeros_alone_are_not_marked_but_real_zeros_mark_all():
    layout = Layout.for_sizes([5, 3])
    x = torch.randn(layout.numel)
    assert layout.numel == 11                       # the last tensor has no gap after it
    x[5:8] = 0.0
    assert count_zeros(x, layout) == 0 and count_zeros(x) == 3
    x[9] = -0.0
    assert count_zeros(x, layout) == 4


def test_scaled_and_stochastic_payloads_with_zeros():
    layout = Layout.for_sizes([40, 24])
    x = with_zeros(layout.numel, 30, seed=3)
    z = count_zeros(x, layout)
    scales = ScaledSign.scales(x, layout, zeros=z)
    msg = ScaledSign().encode(x, layout, scales, zeros=z)
    assert msg.numel() == expected_nbytes(layout.numel, z, n_scales=2)
    p = split1(msg, "scaled_sign", layout.numel)
    assert torch.equal(p.scales, scales)
    assert torch.equal(ScaledSign().decode(p, layout),
                       ScaledSign.decompress_local(x, scales, layout))
    msg = StochasticSign().encode(x, float(x.abs().max()), seed=1, offset=0, send_norm=True)
    p = split1(msg, "stochastic_sign", layout.numel)
    decoded = Sign().decode(p, layout.numel)
    assert torch.equal(decoded == 0, x == 0)        # zeros send 0, never a coin
    all_zero = StochasticSign().encode(torch.zeros(100), 0.0, seed=1, offset=0, send_norm=True)
    assert all_zero.numel() == wire.HEADER_NBYTES + 4
    assert split1(all_zero, "stochastic_sign", 100).header.zero_form() == "all"


def test_bad_zero_marks_are_refused():
    n = 1000
    x = with_zeros(n, 3, seed=1)
    msg = Sign().encode(x)
    p = split1(msg, "sign", n)
    assert p.header.zero_form() == "list"
    z0 = wire.HEADER_NBYTES + r4(125)
    bad = msg.clone()
    bad[z0:z0 + 12].view(torch.int32)[:] = torch.tensor([5, 3, 900], dtype=torch.int32)
    with pytest.raises(wire.PayloadError, match="ascending"):
        split1(bad, "sign", n)
    bad[z0:z0 + 12].view(torch.int32)[:] = torch.tensor([3, 5, 1000], dtype=torch.int32)
    with pytest.raises(wire.PayloadError, match="ascending"):
        split1(bad, "sign", n)
    bad = msg.clone()
    pos = int(p.zeros[0])
    bad[wire.HEADER_NBYTES + pos // 8] |= 1 << (pos % 8)
    with pytest.raises(wire.PayloadError, match="sign bits that are set"):
        split1(bad, "sign", n)
    bad = msg.clone()
    bad[12:16].view(torch.int32)[0] = n + 1
    with pytest.raises(wire.PayloadError, match="marks 1001 zeros"):
        split1(bad, "sign", n)
    plane = Sign().encode(with_zeros(n, 400, seed=2))
    marks = kernels.unpack_bits(split1(plane, "sign", n).zeros, n)
    pos = int(torch.nonzero(marks)[0])
    bad = plane.clone()
    bad[wire.HEADER_NBYTES + pos // 8] |= 1 << (pos % 8)
    with pytest.raises(wire.PayloadError, match="sign bits that are set"):
        split1(bad, "sign", n)
    odd = Sign().encode(with_zeros(13, 5, seed=2))     # 2 sign bytes, 2 padding, 2-byte plane
    assert odd.numel() == wire.HEADER_NBYTES + 8
    bad = odd.clone()
    bad[wire.HEADER_NBYTES + 4 + 1] |= 0x80            # bit 15 > n = 13
    with pytest.raises(wire.PayloadError, match="padding"):
        split1(bad, "sign", 13)
    fp = wire.build(wire.Header("fp32", 2, nnz=1, flags=wire.FLAG_ZEROS),
                    body=torch.zeros(2))
    with pytest.raises(wire.PayloadError, match="codec 'fp32'"):
        split1(fp, "fp32", 2)


# ---- aggregates against a plain torch reference from float signs ------------------------------


def rank_vectors(n_ranks, n, densities, seed):
    return [with_zeros(n, int(d * n), seed=seed + m) for m, d in enumerate(densities)]


def reference_sum(xs, weights=None):
    """Float32 additions from +0.0 in rank order of w_m * sign(x_m) (sign(0) = 0)."""
    acc = torch.zeros(xs[0].numel(), dtype=torch.float32)
    for m, x in enumerate(xs):
        w = torch.tensor(1.0 if weights is None else weights[m], dtype=torch.float32)
        acc = acc + w * float_signs(x)
    return acc


@SETTINGS
@given(n_ranks=st.integers(1, 6), n=st.sampled_from(LENGTHS),
       densities=st.lists(st.sampled_from([0.0, 0.002, 0.05, 0.3, 1.0]), min_size=6,
                          max_size=6),
       mode=st.sampled_from(["majority", "mean", "sum"]), weighted=st.booleans(),
       seed=st.integers(0, 10_000))
def test_sign_aggregate_matches_reference(n_ranks, n, densities, mode, weighted, seed):
    xs = rank_vectors(n_ranks, n, densities[:n_ranks], seed)
    gathered = torch.cat([Sign().encode(x) for x in xs])
    payloads = wire.split(gathered, n_ranks, bucket="t", codec="sign", n=n)
    weights = None
    if weighted:
        weights = (torch.rand(n_ranks, generator=torch.Generator().manual_seed(seed)) + 0.1)
        weights = weights.tolist()
    got = Sign().aggregate(payloads, n, mode, weights=weights)
    want = reference_sum(xs, weights)
    if mode == "majority":
        want = torch.sign(want)
    elif mode == "mean":
        want = want / n_ranks
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))   # -0.0 != +0.0 here
    # coordinates where no rank has a zero get exactly what the fused kernel gives
    dense = torch.stack([x != 0 for x in xs]).all(0)
    fused = kernels.vote(torch.stack([kernels.pack_signs(x) for x in xs]), n,
                         "majority" if mode == "majority" else "sum", weights=weights)
    if mode == "mean":
        fused = fused / n_ranks
    assert torch.equal(got[dense], fused[dense])


@SETTINGS
@given(n_ranks=st.integers(1, 5),
       sizes=st.lists(st.sampled_from([1, 3, 8, 9, 40, 130]), min_size=1, max_size=4),
       densities=st.lists(st.sampled_from([0.0, 0.01, 0.3, 1.0]), min_size=5, max_size=5),
       seed=st.integers(0, 10_000))
def test_scaled_sign_aggregate_matches_reference(n_ranks, sizes, densities, seed):
    layout = Layout.for_sizes(sizes)
    xs = []
    for m in range(n_ranks):
        x = with_zeros(layout.numel, int(densities[m] * layout.numel), seed=seed + m)
        for o, s in layout.segments():
            x[o + s:(o + s + 7) // 8 * 8] = 0.0
        xs.append(x)
    codec = ScaledSign()
    scales = [codec.scales(x, layout) for x in xs]
    gathered = torch.cat([codec.encode(x, layout, sc) for x, sc in zip(xs, scales)])
    payloads = wire.split(gathered, n_ranks, bucket="t", codec="scaled_sign", n=layout.numel)
    got = codec.aggregate(payloads, layout)
    want = torch.zeros(layout.numel)
    for x, sc in zip(xs, scales):
        w = torch.zeros(layout.numel)
        for t, (o, s) in enumerate(layout.segments()):
            w[o:o + s] = sc[t] / n_ranks
        want = want + w * float_signs(x)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))   # -0.0 != +0.0 here


def test_a_zero_rank_does_not_break_a_tie():
    """Three ranks: +1, -1 and 0 at a coordinate: the majority is 0, not the zero rank's +1."""
    xs = [torch.tensor([1.0, 2.0, -1.0, 0.0]), torch.tensor([-1.0, 2.0, -1.0, 0.0]),
          torch.tensor([0.0, -0.0, 0.0, -0.0])]
    gathered = torch.cat([Sign().encode(x) for x in xs])
    payloads = wire.split(gathered, 3, bucket="t", codec="sign", n=4)
    assert Sign().aggregate(payloads, 4).tolist() == [0.0, 1.0, -1.0, 0.0]
    assert Sign().aggregate(payloads, 4, "sum").tolist() == [0.0, 2.0, -2.0, 0.0]


# ---- scaled sign: the scale and the error memory -------------------------------------------------


def test_scales_without_zeros_are_bit_identical_to_l1_over_d():
    layout = Layout.for_sizes([37, 1, 130])
    x = torch.randn(layout.numel)
    old = torch.stack([x[o:o + s].abs().sum() / max(s, 1)
                       for o, s in layout.segments()]).to(torch.float32)
    assert torch.equal(ScaledSign.scales(x, layout).view(torch.int32), old.view(torch.int32))


def test_scales_with_zeros_divide_by_nnz():
    layout = Layout.for_sizes([4, 3, 2])
    x = torch.zeros(layout.numel)
    x[0:4] = torch.tensor([2.0, 0.0, -4.0, -0.0])
    x[8:11] = torch.tensor([1.0, 2.0, 3.0])
    assert ScaledSign.scales(x, layout).tolist() == [3.0, 2.0, 0.0]
    q = ScaledSign.decompress_local(x, ScaledSign.scales(x, layout), layout)
    assert q[0:4].tolist() == [3.0, 0.0, -3.0, 0.0] and q[16:18].tolist() == [0.0, 0.0]


def test_ef_signsgd_conservation_and_untouched_rows_with_zeros():
    """sum_t q_t + e_T == sum_t g_t per rank with embedding-like sparse gradients; rows no
    rank ever touches get update 0 and keep e = 0 exactly."""
    sizes = [64 * 8, 13]
    sim = Simulation("ef_signsgd", n_ranks=3, sizes=sizes)
    layout = sim.layout
    sent = [torch.zeros(layout.numel, dtype=torch.float64) for _ in range(3)]
    total = [torch.zeros(layout.numel, dtype=torch.float64) for _ in range(3)]
    codec = ScaledSign()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        grads = []
        for _ in range(3):
            emb = torch.zeros(64, 8)
            rows = torch.randint(0, 32, (3,), generator=gen)     # rows 32.. never touched
            emb[rows] = torch.randn(3, 8, generator=gen)
            grads.append(sim.flatten([emb, torch.randn(13, generator=gen)]))
        update = sim.step(grads)
        assert torch.equal(update[32 * 8:64 * 8], torch.zeros(32 * 8))
        for r in range(3):
            payload = split1(sim.last_messages[r], "scaled_sign", layout.numel)
            sent[r] += codec.decode(payload, layout).double()
            total[r] += grads[r].double()
    for r in range(3):
        err = sim.states[r]["error"].double()
        assert torch.allclose(sent[r] + err, total[r], atol=1e-4), r
        assert torch.equal(sim.states[r]["error"][32 * 8:64 * 8], torch.zeros(32 * 8))


@pytest.mark.parametrize("method", ["signsgd", "signum", "stochastic_sign", "ssdm",
                                    "ef_signsgd", "ecx"])
def test_methods_leave_all_zero_coordinates_alone(method):
    sizes = [100 * 4, 7]
    sim = Simulation(method, n_ranks=3, sizes=sizes)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = []
        for _ in range(3):
            emb = torch.zeros(100, 4)
            emb[torch.randint(0, 10, (2,), generator=gen)] = torch.randn(2, 4, generator=gen)
            grads.append([emb, torch.randn(7, generator=gen)])
        update = sim.step(grads)
        assert torch.equal(update[40:400], torch.zeros(360)), method
        assert update[400:407].abs().sum() > 0


def test_count_zeros_matches_numpy():
    x = with_zeros(10_000, 123, seed=5)
    assert kernels.count_zeros(x) == int(np.count_nonzero(x.numpy() == 0)) == 123


def test_stock_horovod_signsgd_compressor_sends_zero_for_zero():
    from hvd_signsgd import Compression
    c = Compression.signsgd
    sent, ctx = c.compress(torch.tensor([2.0, -3.0, 0.0, -0.0]))
    assert sent.dtype == torch.float16 and sent.tolist() == [1.0, -1.0, 0.0, 0.0]
    # ranks sent (+1, -1, 0): the average is 0, no move
    assert c.decompress((sent + torch.tensor([-1.0, -1.0, 0.0, 0.0]).half()) / 3, ctx).tolist() \
        == [0.0, -1.0, 0.0, 0.0]


def reference_marks(x, z):
    """_mark_zeros as written before the native scan: x == 0, nonzero(), index_put."""
    n = x.numel()
    pos = torch.nonzero(x == 0).reshape(-1)
    if 4 * z < (n + 7) // 8:
        plane = torch.zeros((n + 7) // 8, dtype=torch.uint8)
        plane.index_put_((pos >> 3,), (1 << (pos & 7)).to(torch.uint8), accumulate=True)
        marks = pos.to(torch.int32)
    else:
        plane = marks = torch.from_numpy(np.packbits((x == 0).numpy(), bitorder="little"))
    return kernels.pack_signs(x).bitwise_and_(plane.bitwise_not()), marks


@SETTINGS
@given(n=st.sampled_from(LENGTHS[2:]), frac=st.sampled_from([0.0005, 0.01, 0.03, 0.2, 0.9]),
       seed=st.integers(0, 10 ** 6))
def test_marks_come_from_one_native_scan_with_the_reference_bytes(n, frac, seed):
    """_mark_zeros takes the zero plane from kernels.sign_scan (one pass): the cleared bits
    and the marks, as a position list (few zeros) or a plane (many), are those of the torch
    reference, -0 included. A non-finite x (the scan refuses it) falls back to torch."""
    from hvd_signsgd.codecs import _mark_zeros
    x = with_zeros(n, max(1, min(n - 1, int(frac * n))), seed)
    y = x.clone()
    y[int(torch.nonzero(x).reshape(-1)[0])] = float("nan")
    for v in (x, y):
        z = int((v == 0).sum())
        want_bits, want_marks = reference_marks(v, z)
        got_bits, got_marks = _mark_zeros(v, kernels.pack_signs(v), z)
        assert torch.equal(got_bits, want_bits)
        assert got_marks.dtype == want_marks.dtype and torch.equal(got_marks, want_marks)
