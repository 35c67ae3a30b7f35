"""Property tests of hvd_signsgd.kernels: native (every ISA) and torch kernels give identical
bytes and values, and both match independent numpy references.

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
from hvd_signsgd.kernels import _cpu
from hvd_signsgd.kernels import _torch as T

NATIVE = K._native
assert NATIVE is not None, f"native extension missing: {K._native_unavailable}"
ISAS = NATIVE.available_isas()
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
BIG = (1 << 20) + 3
LENGTHS = st.one_of(
    st.sampled_from([0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 2047,
                     2048, 2049, 4097]),
    st.integers(0, 5000),
)
LAYOUTS = ["contiguous", "strided", "transposed", "offset"]
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def isa(name):
    previous = NATIVE.set_isa(name)
    try:
        yield
    finally:
        NATIVE.set_isa(previous)


def bits_of(t):
    """Bit patterns, so that NaNs and signed zeros compare exactly."""
    return t.contiguous().view(INT_OF.get(t.dtype, t.dtype))


def assert_identical(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits_of(a), bits_of(b))


def random_bits(n, dtype, seed):
    """Uniform random bit patterns: every sign, NaN, inf, subnormal and zero shows up."""
    rng = np.random.default_rng(seed)
    ints = rng.integers(-(2**31), 2**31, size=n, dtype=np.int64)
    itype = INT_OF[dtype]
    t = torch.from_numpy(ints).to(itype if itype == torch.int32 else torch.int32)
    if itype == torch.int16:
        t = (t >> 16).to(torch.int16)
    t = t.view(dtype)
    t[: min(n, 4)] = torch.tensor([0.0, -0.0, math.inf, -math.inf])[: min(n, 4)].to(dtype)
    return t


def random_values(n, dtype, seed, scale=1.0):
    """Gaussian values with signed zeros, infinities and NaNs of both signs mixed in."""
    rng = np.random.default_rng(seed)
    v = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * scale).to(dtype)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan]).to(dtype)
    if n:
        where = torch.from_numpy(rng.integers(0, n, size=min(n, 6)))
        v[where] = specials[: where.numel()]
    return v


def layout(x, kind):
    """A view of the values of x (numel n) in the given memory layout."""
    n = x.numel()
    if kind == "strided":
        base = torch.zeros(2 * n, dtype=x.dtype)
        base[::2] = x
        return base[::2]
    if kind == "transposed" and n % 2 == 0 and n > 0:
        return x.reshape(2, n // 2).t().contiguous().t()
    if kind == "offset":
        base = torch.zeros(n + 1, dtype=x.dtype)
        base[1:] = x
        return base[1:]
    return x.clone()


def numpy_pack(neg):
    return torch.from_numpy(np.packbits(neg.numpy().astype(np.uint8), bitorder="little"))


def native_pack(x):
    return _cpu.pack_signs(NATIVE, x)


# ---- pack_signs -------------------------------------------------------------------------------


@SETTINGS
@given(n=LENGTHS, dtype=st.sampled_from(FLOATS), kind=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2**32 - 1), isa_name=st.sampled_from(ISAS))
@example(n=BIG, dtype=torch.float32, kind="contiguous", seed=1, isa_name=ISAS[-1])
@example(n=BIG, dtype=torch.bfloat16, kind="strided", seed=2, isa_name=ISAS[-1])
@example(n=BIG, dtype=torch.float16, kind="contiguous", seed=3, isa_name="portable")
def test_pack_signs_identical(n, dtype, kind, seed, isa_name):
    x = layout(random_bits(n, dtype, seed), kind)
    expected = numpy_pack((x.contiguous().view(INT_OF[dtype]) < 0).reshape(-1))
    with isa(isa_name):
        native = native_pack(x)
        public = K.pack_signs(x)
    fallback = T.pack_signs(x)
    assert native.dtype == torch.uint8 and native.shape == ((n + 7) // 8,)
    assert torch.equal(native, expected)
    assert torch.equal(fallback, expected)
    assert torch.equal(public, expected)


def test_pack_zero_and_nan_rule():
    x = torch.tensor([0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, 1e-45, -1e-45, 3.0])
    for dtype in FLOATS:
        xd = x.to(dtype)
        nan = {torch.float32: 0x7FC00000, torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}[dtype]
        ints = xd.view(INT_OF[dtype])  # NaNs with a known sign bit (casts may change it)
        ints[2] = nan
        width = 8 * ints.element_size()
        ints[3] = (nan | 1 << (width - 1)) - (1 << width)  # the same NaN, sign bit set
        for fn in (K.pack_signs, T.pack_signs):
            assert fn(xd).tolist() == [0b10101010, 0], (dtype, fn)
        assert T.pack_signs(torch.tensor([[-1.0, 2.0], [3.0, -4.0]]).t()).tolist() == [0b1001]


def test_pack_multidim_and_requires_grad():
    x = torch.randn(3, 5, 7, requires_grad=True)
    expected = numpy_pack((x.detach() < 0).reshape(-1))
    assert torch.equal(K.pack_signs(x), expected)
    assert torch.equal(T.pack_signs(x.detach()), expected)
    assert torch.equal(K.pack_signs(x.detach()[:, ::2, 1:]),
                       numpy_pack((x.detach()[:, ::2, 1:] < 0).reshape(-1)))


# ---- unpack_signs -----------------------------------------------------------------------------

SCALES = st.one_of(
    st.sampled_from([1.0, -1.0, 0.0, -0.0, 0.1, 1 / 3, 65504.0, 65519.99, 65520.0, 1e-6, 6e-8,
                     2.0**-25, 3 * 2.0**-26, 1e30, -1e-30, math.inf, -math.inf, 2.0**-149]),
    st.floats(allow_nan=False, allow_infinity=True, width=64),
)


@SETTINGS
@given(n=LENGTHS, dtype=st.sampled_from(FLOATS), scale=SCALES, seed=st.integers(0, 2**32 - 1),
       isa_name=st.sampled_from(ISAS), spare=st.integers(0, 9))
@example(n=BIG, dtype=torch.float32, scale=0.5, seed=4, isa_name=ISAS[-1], spare=0)
@example(n=BIG, dtype=torch.bfloat16, scale=-3.0, seed=5, isa_name="portable", spare=3)
def test_unpack_round_trip(n, dtype, scale, seed, isa_name, spare):
    x = random_bits(n, dtype, seed)
    packed = T.pack_signs(x)
    if spare:  # extra bytes after the packed vector must be ignored
        packed = torch.cat([packed, torch.full((spare,), 0xFF, dtype=torch.uint8)])
    value = torch.tensor(scale, dtype=torch.float32).to(dtype)
    expected = torch.where(bits_of(x) < 0, -value, value)
    fallback = torch.empty(n, dtype=dtype)
    T.unpack_signs(packed, n, scale, fallback)
    with isa(isa_name):
        native = torch.empty(n + spare, dtype=dtype)
        returned = K.unpack_signs(packed, n, scale, out=native)
        fresh = K.unpack_signs(packed, n, scale, dtype=dtype)
    assert_identical(fallback, expected)
    assert_identical(returned, expected)
    assert_identical(fresh, expected)
    assert n == 0 or returned.data_ptr() == native.data_ptr()
    assert (returned is native) == (spare == 0)


def test_unpack_returns_out_with_its_shape():
    out = torch.empty(3, 4, dtype=torch.float16)
    bits = K.pack_signs(torch.tensor([-1.0] * 12))
    assert K.unpack_signs(bits, 12, 2.0, out=out) is out
    assert (out == -2).all()


def test_scale_rounding_matches_torch_casts():
    """The C float -> float16/bfloat16 rounding equals torch's, boundaries included."""
    rng = np.random.default_rng(0)
    samples = [65504.0, 65519.99, 65520.0, 65536.0, 2.0**-14, 2.0**-24, 2.0**-25, 2.0**-26,
               1.5 * 2.0**-25, 3 * 2.0**-26, 2.0**-15 * 1.0009765625, 1.00048828125,
               1.00146484375, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-9, 3.0e38, 1e-40, 0.0, -0.0]
    samples += list(rng.standard_normal(300) * 10.0 ** rng.integers(-12, 8, 300))
    randbits = rng.integers(0, 2**32, size=300, dtype=np.uint64).astype(np.uint32)
    samples += [float(v) for v in randbits.view(np.float32) if np.isfinite(v)]
    bits = torch.tensor([0, 1], dtype=torch.uint8)
    for dtype in FLOATS:
        for s in samples:
            for value in (s, -s):
                out = torch.empty(1, dtype=dtype)
                NATIVE.unpack_signs(bits.numpy(), 1, _cpu.buffer(out), value)
                expected = torch.tensor([value], dtype=torch.float32).to(dtype)
                assert torch.equal(bits_of(out), bits_of(expected)), (dtype, value)


# ---- vote -------------------------------------------------------------------------------------

RANKS = st.one_of(st.integers(1, 9), st.just(64))
WEIGHTS = st.one_of(
    st.none(),
    st.sampled_from(["ones", "random", "tensor", "halves"]),
)


def gathered(n_ranks, n, seed, header=3, tail=2):
    """Allgather-style buffer: payloads of header + ceil(n/8) + tail random bytes laid end to
    end; returns the (n_ranks, ceil(n/8)) strided view of the packed vectors."""
    nb = (n + 7) // 8
    rng = np.random.default_rng(seed)
    flat = torch.from_numpy(rng.integers(0, 256, size=n_ranks * (header + nb + tail),
                                         dtype=np.uint8))
    return flat.view(n_ranks, header + nb + tail)[:, header:header + nb]


def make_weights(kind, n_ranks, seed):
    rng = np.random.default_rng(seed + 1)
    if kind is None:
        return None
    if kind == "ones":
        return [1.0] * n_ranks
    if kind == "halves":  # exact ties are likely
        return [0.5 * (m % 3) for m in range(n_ranks)]
    values = (rng.standard_normal(n_ranks) * 10.0 ** rng.integers(-3, 4, n_ranks)).tolist()
    return torch.tensor(values, dtype=torch.float32) if kind == "tensor" else values


def naive_vote(rows, n, mode, weights):
    """Unpack every rank to float32 +-1, then add them up in rank order (plain torch)."""
    bit_index = torch.arange(8, dtype=torch.uint8)
    set_bits = (rows.unsqueeze(-1) >> bit_index) & 1  # (n_ranks, nbytes, 8)
    signs = (1.0 - 2.0 * set_bits.to(torch.float32)).reshape(rows.shape[0], -1)[:, :n]
    w = torch.ones(rows.shape[0]) if weights is None else torch.as_tensor(weights).float()
    total = torch.zeros(n)
    for m in range(rows.shape[0]):
        total = total + signs[m] * w[m]
    if mode == "majority":
        total = torch.sign(total) + 0.0  # + 0.0: no -0.0
    if mode == "mean":                    # the sum, then torch's division by the row count
        total = total.div_(rows.shape[0])
    return total


@SETTINGS
@given(n_ranks=RANKS, n=LENGTHS, mode=st.sampled_from(["majority", "sum", "mean"]),
       weights=WEIGHTS,
       seed=st.integers(0, 2**32 - 1), isa_name=st.sampled_from(ISAS))
@example(n_ranks=8, n=BIG, mode="majority", weights=None, seed=6, isa_name=ISAS[-1])
@example(n_ranks=64, n=BIG, mode="sum", weights=None, seed=7, isa_name=ISAS[-1])
@example(n_ranks=5, n=BIG, mode="sum", weights="random", seed=8, isa_name=ISAS[-1])
@example(n_ranks=9, n=BIG, mode="majority", weights=None, seed=9, isa_name="portable")
@example(n_ranks=300, n=4099, mode="sum", weights=None, seed=10, isa_name=ISAS[-1])
@example(n_ranks=256, n=2100, mode="majority", weights=None, seed=11, isa_name="portable")
@example(n_ranks=7, n=BIG, mode="mean", weights=None, seed=12, isa_name=ISAS[-1])
@example(n_ranks=300, n=4099, mode="mean", weights=None, seed=13, isa_name=ISAS[-1])
def test_vote_matches_naive(n_ranks, n, mode, weights, seed, isa_name):
    rows = gathered(n_ranks, n, seed)
    w = None if mode == "mean" else make_weights(weights, n_ranks, seed)
    expected = naive_vote(rows, n, mode, w)
    w_tensor = None if w is None else torch.as_tensor(w, dtype=torch.float32)
    fallback = torch.empty(n)
    T.vote(rows, n, mode, w_tensor, fallback)
    with isa(isa_name):
        public = K.vote(rows, n, mode, w)
        out = torch.full((n + 5,), 7.0)
        into = K.vote(rows, n, mode, w, out=out)
        # off a 32-byte boundary: the plain stores, not the streamed ones
        off = torch.full((n + 5,), 7.0)
        into_off = K.vote(rows, n, mode, w, out=off[1:n + 1])
    assert_identical(fallback, expected)
    assert_identical(public, expected)
    assert_identical(into, expected)
    assert_identical(into_off, expected)
    assert torch.equal(out[n:], torch.full((5,), 7.0))
    assert off[0] == 7.0 and torch.equal(off[n + 1:], torch.full((4,), 7.0))


def torch_vote(rows, n, mode="majority", weights=None):
    out = torch.empty(n)
    w = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    T.vote(rows, n, mode, w, out)
    return out


def test_vote_ties_give_zero():
    plus, minus = T.pack_signs(torch.ones(10)), T.pack_signs(-torch.ones(10))
    rows = torch.stack([plus, minus, plus, minus])
    for name in ISAS:
        with isa(name):
            for fn in (K.vote, torch_vote):
                assert fn(rows, 10).tolist() == [0.0] * 10
                assert fn(rows[:3], 10).tolist() == [1.0] * 10
                assert fn(rows, 10, weights=[1.0, 0.5, 1.0, 2.0]).tolist() == [-1.0] * 10
                assert fn(rows, 10, "sum", [1.0, 0.25, 0.5, 0.5]).tolist() == [0.75] * 10


def test_vote_native_1d_and_nonfinite_weights():
    rows = gathered(6, 999, seed=3, header=0, tail=0).contiguous()
    out = np.empty(999, dtype=np.float32)
    NATIVE.vote(rows.reshape(-1).numpy(), 999, out, "sum", None, n_ranks=6)
    assert_identical(torch.from_numpy(out), naive_vote(rows, 999, "sum", None))
    # NaN sums: majority gives 0; the NaNs' own sign and payload are unspecified.
    for w in ([1.0, math.inf, -math.inf, 2.0, 3.0, 1.0], [1.0, 2.0, 3.0, math.nan, 1.0, 1.0]):
        for mode in ("sum", "majority"):
            fallback = torch_vote(rows, 999, mode, w)
            assert fallback.isnan().any() == (mode == "sum")
            for name in ISAS:
                with isa(name):
                    torch.testing.assert_close(K.vote(rows, 999, mode, w), fallback, rtol=0,
                                               atol=0, equal_nan=True)


# ---- pack_stochastic_signs --------------------------------------------------------------------

NORMS = st.one_of(st.sampled_from([1.0, 0.0, 1e-40, 1e-30, math.inf, 3.5]),
                  st.floats(1e-3, 1e3))
OFFSETS = st.one_of(  # near a 2^32 boundary, the counter's high word changes mid-vector
    st.integers(0, 2**40), st.just(0),
    st.builds(lambda k, hi: hi * 2**32 - k, st.integers(-64, 64), st.integers(1, 3)))


@SETTINGS
@given(n=LENGTHS, dtype=st.sampled_from(FLOATS), kind=st.sampled_from(LAYOUTS), norm=NORMS,
       seed=st.integers(-(2**70), 2**70), offset=OFFSETS, isa_name=st.sampled_from(ISAS),
       value_seed=st.integers(0, 2**32 - 1))
@example(n=BIG, dtype=torch.float32, kind="contiguous", norm=3.0, seed=1, offset=2**32 - 77,
         isa_name=ISAS[-1], value_seed=1)
@example(n=100, dtype=torch.bfloat16, kind="contiguous", norm=1.0, seed=3, offset=2**32 - 39,
         isa_name=ISAS[-1], value_seed=3)
@example(n=BIG, dtype=torch.float16, kind="strided", norm=2.0, seed=2, offset=5,
         isa_name="portable", value_seed=2)
def test_stochastic_identical(n, dtype, kind, norm, seed, offset, isa_name, value_seed):
    x = layout(random_values(n, dtype, value_seed), kind)
    fallback = T.pack_stochastic_signs(x, norm, seed, offset)
    with isa(isa_name):
        native = K.pack_stochastic_signs(x, norm, seed, offset)
    assert native.shape == ((n + 7) // 8,)
    assert torch.equal(native, fallback)
    if n % 8:  # padding bits are zero
        assert int(native[-1]) >> (n % 8) == 0


def test_stochastic_tensor_norm_and_edges():
    x = torch.randn(1000)
    a = K.pack_stochastic_signs(x, torch.tensor(4.0, dtype=torch.float64), 9, 3)
    assert torch.equal(a, T.pack_stochastic_signs(x, torch.tensor(4.0), 9, 3))
    assert torch.equal(a, K.pack_stochastic_signs(x, 4.0, 9, 3))
    assert torch.equal(T.pack_stochastic_signs(x, torch.tensor(0.0), 9, 3),
                       K.pack_stochastic_signs(x, 0.0, 9, 3))
    n = 2000
    end = (1 << 63) - n
    assert torch.equal(K.pack_stochastic_signs(x[:10].repeat(200), 2.0, 1, end),
                       T.pack_stochastic_signs(x[:10].repeat(200), 2.0, 1, end))


@pytest.mark.parametrize("high", [1, 2, 2**31 - 5])
def test_stochastic_counter_high_word(high):
    """Vectors that straddle a multiple of 2^32: every lane must use its own high word."""
    x = torch.zeros(48)
    for k in range(1, 41):
        offset = high * 2**32 - k
        for seed in range(24):
            expected = T.pack_stochastic_signs(x, 1.0, seed, offset)
            for name in ISAS:
                with isa(name):
                    assert torch.equal(K.pack_stochastic_signs(x, 1.0, seed, offset), expected)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3000), cuts=st.lists(st.integers(0, 3000), max_size=4),
       offset=st.integers(0, 2**34), seed=st.integers(0, 2**64 - 1))
def test_stochastic_split_invariance(n, cuts, offset, seed):
    """Element i only depends on (seed, offset + i): splitting the call changes nothing."""
    x = random_values(n, torch.float32, seed % 1000, scale=0.5)
    whole = T.unpack_bools(K.pack_stochastic_signs(x, 2.0, seed, offset), n)
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    parts = [T.unpack_bools(K.pack_stochastic_signs(x[a:b], 2.0, seed, offset + a), b - a)
             for a, b in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat(parts), whole)


def test_stochastic_is_unbiased():
    """Over many seeds the mean of the unpacked signs is x / norm, within 5 binomial sigmas."""
    norm, seeds = 2.0, 4000
    x = torch.linspace(-norm, norm, 61)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 3 * norm, -3 * norm])])  # |x| > norm saturates
    target = (x / norm).clamp(-1, 1).double()
    for dtype in FLOATS:
        xd = x.to(dtype)
        total = torch.zeros(x.numel(), dtype=torch.float64)
        for seed in range(seeds):
            total += K.unpack_signs(K.pack_stochastic_signs(xd, norm, seed), x.numel()).double()
        mean = total / seeds
        target_d = (xd.double() / norm).clamp(-1, 1)
        bound = 5 * torch.sqrt((1 - target_d**2) / seeds) + 1e-6
        assert ((mean - target_d).abs() <= bound).all(), (dtype, (mean - target).abs().max())
    fair = K.unpack_signs(K.pack_stochastic_signs(torch.zeros(40000), 0.0, 1), 40000)
    assert abs(float(fair.mean())) < 5 / math.sqrt(40000)


def test_stochastic_seeds_decorrelate():
    """Different seeds (and neighbouring elements) give independent-looking bits."""
    n = 1 << 16
    x = torch.zeros(n)
    a = T.unpack_bools(K.pack_stochastic_signs(x, 1.0, 1), n)
    b = T.unpack_bools(K.pack_stochastic_signs(x, 1.0, 2), n)
    c = T.unpack_bools(K.pack_stochastic_signs(x, 1.0, 1, offset=1), n)
    sigma = 0.5 / math.sqrt(n)
    assert abs(float((a != b).float().mean()) - 0.5) < 5 * sigma
    assert abs(float((a[1:] != a[:-1]).float().mean()) - 0.5) < 5 * sigma
    assert torch.equal(c[:-1], a[1:])


# ---- argument checks of the public face -------------------------------------------------------


def test_public_argument_errors():
    x = torch.randn(20)
    bits = K.pack_signs(x)
    with pytest.raises(TypeError):
        K.pack_signs(torch.arange(4))
    with pytest.raises(TypeError):
        K.pack_signs(np.zeros(4, dtype=np.float32))
    with pytest.raises(TypeError):
        K.pack_stochastic_signs(x.double(), 1.0, 1)
    with pytest.raises(ValueError):
        K.pack_stochastic_signs(x, -1.0, 1)
    with pytest.raises(ValueError):
        K.pack_stochastic_signs(x, math.nan, 1)
    with pytest.raises(ValueError):
        K.pack_stochastic_signs(x, 1.0, 1, offset=-1)
    with pytest.raises(TypeError):
        K.pack_stochastic_signs(x, 1.0, 1.5)
    with pytest.raises(TypeError):
        K.unpack_signs(bits.to(torch.int8), 20)
    with pytest.raises(ValueError):
        K.unpack_signs(bits, 25)
    with pytest.raises(ValueError):
        K.unpack_signs(bits, -1)
    with pytest.raises(TypeError):
        K.unpack_signs(bits, 20, out=torch.empty(20, dtype=torch.float64))
    with pytest.raises(ValueError):
        K.unpack_signs(bits, 20, out=torch.empty(19))
    with pytest.raises(ValueError):
        K.unpack_signs(bits, 20, out=torch.empty(40)[::2])
    with pytest.raises(TypeError):
        K.unpack_signs(bits, 20, dtype=torch.int32)
    rows = torch.stack([bits, bits])
    with pytest.raises(ValueError):
        K.vote(rows, 20, mode="average")
    with pytest.raises(ValueError):                  # the mean is of unweighted votes
        K.vote(rows, 20, mode="mean", weights=[1.0, 1.0])
    with pytest.raises(ValueError):
        K.vote(rows, 30)
    with pytest.raises(ValueError):
        K.vote(bits, 20)
    with pytest.raises(ValueError):
        K.vote(rows[:0], 20)
    with pytest.raises(ValueError):
        K.vote(rows, 20, weights=[1.0])
    with pytest.raises(TypeError):
        K.vote(rows, 20, weights="ab")
    with pytest.raises(TypeError):
        K.vote(rows, 20, out=torch.empty(20, dtype=torch.float16))
    with pytest.raises(ValueError):
        K.vote(rows, 20, out=torch.empty(10))


def test_vote_column_strided_rows_are_accepted():
    rows = gathered(4, 64, seed=5)
    transposed = rows.t().contiguous().t()  # unit stride across ranks, not inside a row
    assert_identical(K.vote(transposed, 64, "sum"), naive_vote(rows, 64, "sum", None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_matches_native():
    x = torch.randn(100_003)
    g = x.cuda()
    assert torch.equal(K.pack_signs(g).cpu(), K.pack_signs(x))
    assert torch.equal(K.pack_stochastic_signs(g, 3.0, 5, 7).cpu(),
                       K.pack_stochastic_signs(x, 3.0, 5, 7))
    bits = K.pack_signs(x)
    assert torch.equal(K.unpack_signs(bits.cuda(), x.numel(), 0.3).cpu(),
                       K.unpack_signs(bits, x.numel(), 0.3))
    rows = gathered(7, x.numel(), seed=1)
    for w in (None, [0.5, 1, 2, 3, 4, 5, -6]):
        assert_identical(K.vote(rows.cuda(), x.numel(), "sum", w).cpu(),
                         K.vote(rows, x.numel(), "sum", w))


# ---- count_zeros, pack_bits / unpack_bits (zero marks, issue 11) -------------------------------


def with_zeros(n, dtype, seed, density):
    """Gaussian values (NaN/inf/signed zeros mixed in) with about density * n more +-0."""
    x = random_values(n, dtype, seed)
    rng = np.random.default_rng(seed + 1)
    hit = torch.from_numpy(rng.random(n) < density)
    sign = torch.from_numpy(rng.random(n) < 0.5)
    x[hit & sign] = 0.0
    x[hit & ~sign] = -0.0
    return x


@SETTINGS
@given(n=LENGTHS, dtype=st.sampled_from(FLOATS), kind=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2**31), density=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
       isa_name=st.sampled_from(ISAS))
@example(n=BIG, dtype=torch.float32, kind="contiguous", seed=1, density=0.001,
         isa_name=ISAS[-1])
@example(n=BIG, dtype=torch.bfloat16, kind="strided", seed=2, density=0.3, isa_name="portable")
def test_count_zeros_identical(n, dtype, kind, seed, density, isa_name):
    x = layout(with_zeros(n, dtype, seed, density), kind)
    expected = int((x.contiguous().view(INT_OF[dtype]) & (0x7FFFFFFF if dtype == torch.float32
                                                          else 0x7FFF) == 0).sum())
    with isa(isa_name):
        native = _cpu.count_zeros(NATIVE, x)
        public = K.count_zeros(x)
    assert native == public == T.count_zeros(x) == expected


def test_count_zeros_signed_zeros_and_specials():
    x = torch.tensor([0.0, -0.0, math.nan, -math.nan, math.inf, 1e-45, -1e-45, 5e-39, 1.0])
    for dtype in FLOATS:
        for name in ISAS:
            with isa(name):
                assert K.count_zeros(x.to(dtype)) == (2 if dtype == torch.float32 else
                                                       int((x.to(dtype) == 0).sum()))
    assert K.count_zeros(torch.zeros(0)) == 0
    with pytest.raises(TypeError):
        K.count_zeros(torch.zeros(3, dtype=torch.int32))


@SETTINGS
@given(n=LENGTHS, seed=st.integers(0, 2**31), density=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_pack_bits_round_trip(n, seed, density):
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(rng.random(n) < density)
    bits = K.pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == ((n + 7) // 8,)
    assert torch.equal(bits, numpy_pack(mask))
    assert torch.equal(bits, T.pack_bools(mask))
    assert torch.equal(K.unpack_bits(bits, n), mask)
    assert torch.equal(T.unpack_bools(bits, n), mask)
    spare = torch.cat([bits, torch.full((3,), 255, dtype=torch.uint8)])
    assert torch.equal(K.unpack_bits(spare, n), mask)


# ---- scaled_vote: the scaled mean of ef_signsgd / ecx, every tensor in one call --------------


@SETTINGS
@given(n_ranks=RANKS, sizes=st.lists(st.one_of(st.sampled_from([0, 1, 7, 8, 9, 33, 4097]),
                                               st.integers(0, 700)), min_size=1, max_size=6),
       seed=st.integers(0, 2**32 - 1))
@example(n_ranks=5, sizes=[BIG, 3, 0, 64], seed=1)
def test_scaled_vote_is_one_weighted_vote_per_segment(n_ranks, sizes, seed):
    """Every ISA and the torch fallback give the bits of vote(mode="sum") segment by segment
    with that segment's weights (halves make exact ties and cancellations likely); elements
    outside the segments (the alignment gaps) are not written."""
    segs, o = [], 0
    for s in sizes:
        segs.append((o, s))
        o = (o + s + 7) // 8 * 8 + 8 * (s % 3)      # gaps of 0-23 elements
    n = o + 5
    rows = gathered(n_ranks, n, seed)
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.choice([0.5, 0.25, 1.5, 3e-3], (len(segs), n_ranks))
                         .astype(np.float32))
    want = torch.full((n,), 7.0)
    for t, (o, s) in enumerate(segs):
        if s:
            torch_vote_into = torch.empty(s)
            T.vote(rows[:, o // 8:(o + s + 7) // 8], s, "sum", w[t], torch_vote_into)
            want[o:o + s] = torch_vote_into
    for name in ISAS:
        with isa(name):
            got = K.scaled_vote(rows, segs, w, torch.full((n,), 7.0))
            assert_identical(got, want)
            got = K.scaled_vote(rows, torch.tensor(segs).reshape(-1, 2), w, torch.full((n,), 7.0))
            assert_identical(got, want)
    saved = K._USE_NATIVE
    K._USE_NATIVE = False
    try:
        assert_identical(K.scaled_vote(rows, segs, w, torch.full((n,), 7.0)), want)
    finally:
        K._USE_NATIVE = saved


@SETTINGS
@given(n_ranks=RANKS, sizes=st.lists(st.one_of(st.sampled_from([1, 7, 8, 9, 63, 64, 65, 4097]),
                                               st.integers(0, 700)), min_size=1, max_size=4),
       density=st.sampled_from([0.0, 0.01, 0.5, 1.0]), seed=st.integers(0, 2**32 - 1))
@example(n_ranks=5, sizes=[BIG, 3, 64], density=0.5, seed=3)
def test_scaled_vote_with_zero_planes_gives_marked_terms_plus_zero(n_ranks, sizes, density, seed):
    """With zero planes, every ISA and the torch fallback give the float32 additions from +0.0
    in rank order of w * (+-1), with +0.0 as the term of a marked element (numpy reference);
    the planes may be strided views, and a plane of 0s gives the unmarked vote's bits."""
    segs, o = [], 0
    for s in sizes:
        segs.append((o, s))
        o = (o + s + 7) // 8 * 8 + 8 * (s % 2)
    n = o + 3
    rows = gathered(n_ranks, n, seed)
    rng = np.random.default_rng(seed + 1)
    marks = rng.random((n_ranks, n)) < density
    planes = torch.from_numpy(np.packbits(marks, axis=1, bitorder="little"))
    planes = torch.cat([planes, planes], 1)[:, :planes.shape[1]]       # a strided view
    w = rng.choice(np.array([0.5, 0.25, 1.5, 3e-3, 0.0], np.float32), (len(segs), n_ranks))
    signs = np.unpackbits(rows.contiguous().numpy(), axis=1, bitorder="little")[:, :n]
    want = np.full(n, 7.0, np.float32)
    for t, (o, s) in enumerate(segs):
        acc = np.zeros(s, np.float32)
        for m in range(n_ranks):
            term = np.where(signs[m, o:o + s] == 1, -w[t, m], w[t, m]).astype(np.float32)
            acc = acc + np.where(marks[m, o:o + s], np.float32(0.0), term)
        want[o:o + s] = acc
    want = torch.from_numpy(want)
    wt = torch.from_numpy(w)
    for name in ISAS:
        with isa(name):
            assert_identical(K.scaled_vote(rows, segs, wt, torch.full((n,), 7.0), zeros=planes),
                             want)
            assert_identical(K.scaled_vote(rows, segs, wt, torch.full((n,), 7.0),
                                           zeros=torch.zeros_like(planes)),
                             K.scaled_vote(rows, segs, wt, torch.full((n,), 7.0)))
    saved = K._USE_NATIVE
    K._USE_NATIVE = False
    try:
        assert_identical(K.scaled_vote(rows, segs, wt, torch.full((n,), 7.0), zeros=planes), want)
    finally:
        K._USE_NATIVE = saved


def test_scaled_vote_argument_errors():
    rows = torch.zeros(2, 8, dtype=torch.uint8)
    w = torch.ones(1, 2)
    out = torch.zeros(64)
    for segs, weights, exc in [([(4, 8)], w, ValueError),               # offset not 8-aligned
                               ([(0, 65)], w, ValueError),              # past out and the rows
                               ([(0, 8)], torch.ones(2, 2), ValueError),  # weights shape
                               ([(8, 8), (0, 8)], torch.ones(2, 2), ValueError)]:  # descending
        with pytest.raises(exc):
            K.scaled_vote(rows, segs, weights, out)
    for segs in ([[4, 8]], [[8, 8], [0, 8]], [[0, 65]]):              # the extension's own
        with pytest.raises(ValueError):                                # checks of a tensor
            K.scaled_vote(rows, torch.tensor(segs), torch.ones(len(segs), 2), out)
    short = torch.zeros(2, 4, dtype=torch.uint8)
    with pytest.raises(ValueError):
        K.scaled_vote(short, [(0, 40)], w, out)                        # rows too short
    raw = np.zeros(64, np.float32)
    with pytest.raises(ValueError):                                    # out overlaps the rows
        NATIVE.scaled_vote(raw.view(np.uint8).reshape(2, -1), np.array([[0, 8]], np.int64),
                           np.ones(2, np.float32), raw[:16])
    saved = K._USE_NATIVE
    try:
        for K._USE_NATIVE in (True, False):
            for zeros, exc in [(torch.zeros(2, 4, dtype=torch.uint8), ValueError),  # too short
                               (torch.zeros(3, 8, dtype=torch.uint8), ValueError),  # 1 per rank
                               (torch.zeros(16, dtype=torch.uint8), ValueError),    # not 2-D
                               (torch.zeros(2, 8), TypeError)]:                     # not uint8
                with pytest.raises(exc):
                    K.scaled_vote(rows, [(0, 40)], w, out, zeros=zeros)
    finally:
        K._USE_NATIVE = saved
    segs, ones = np.array([[0, 40]], np.int64), np.ones(2, np.float32)
    for zeros, what in [(np.zeros((2, 4), np.uint8), "zeros rows have 4 bytes, need 5"),
                        (np.zeros((3, 8), np.uint8), "one row per rank"),
                        (np.zeros(16, np.uint8), "one row per rank"),
                        (np.zeros((2, 16), np.uint8)[:, ::2], "unit stride"),
                        (raw.view(np.uint8)[64:80].reshape(2, 8), "overlap")]:  # inside out
        with pytest.raises(ValueError, match=what):                    # the extension's own
            NATIVE.scaled_vote(rows.numpy(), segs, ones, raw[:48], zeros)
