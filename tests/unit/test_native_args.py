"""The raw extension (hvd_signsgd._native) rejects bad arguments with TypeError / ValueError and
never crashes: wrong dtype, wrong length, non-contiguous, too-small or overlapping output."""
import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_signsgd import kernels

N = kernels._native
assert N is not None, f"native extension missing: {kernels._native_unavailable}"


def f32(n):
    return np.random.default_rng(n).standard_normal(n).astype(np.float32)


def test_pack_accepts_buffers_and_returns_bytes():
    x = f32(13)
    expected = np.packbits(np.signbit(x), bitorder="little").tobytes()
    assert N.pack_signs(x) == expected
    assert N.pack_signs(memoryview(x)) == expected
    assert N.pack_signs(array.array("f", x.tolist())) == expected
    out = bytearray(5)
    assert N.pack_signs(x, out) is out and bytes(out[:2]) == expected
    assert N.pack_signs(x.astype(np.float16)) == expected
    assert N.pack_signs(x.reshape(1, 13)) == expected
    assert N.pack_signs(np.zeros(0, np.float32)) == b""


@pytest.mark.parametrize("fn", ["pack_signs", "pack_stochastic_signs"])
def test_pack_argument_errors(fn):
    call = (lambda x, **k: N.pack_signs(x, **k)) if fn == "pack_signs" else \
        (lambda x, **k: N.pack_stochastic_signs(x, 1.0, 3, **k))
    with pytest.raises(TypeError):
        call(np.zeros(8, np.float64))
    with pytest.raises(TypeError):
        call(np.zeros(8, np.int32))
    with pytest.raises(TypeError):
        call([1.0, 2.0])
    with pytest.raises(TypeError):
        call(np.zeros(8, ">f4"))
    with pytest.raises(ValueError):
        call(f32(16)[::2])
    with pytest.raises(ValueError):
        call(f32(16), out=bytearray(1))
    with pytest.raises(ValueError):
        call(f32(16), out=b"\0\0")  # read-only
    with pytest.raises(TypeError):
        call(f32(16), out=np.zeros(2, np.float32))
    with pytest.raises(ValueError):
        call(f32(16), out=np.zeros(4, np.uint8)[::2])
    x = f32(64)
    with pytest.raises(ValueError):
        call(x, out=x.view(np.uint8))  # aliases the input


def test_stochastic_argument_errors():
    x = f32(16)
    for norm in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            N.pack_stochastic_signs(x, norm, 1)
    with pytest.raises(TypeError):
        N.pack_stochastic_signs(x, 1.0, 1.5)
    with pytest.raises(TypeError):
        N.pack_stochastic_signs(x, "1", 1)
    with pytest.raises(ValueError):
        N.pack_stochastic_signs(x, 1.0, 1, -1)
    with pytest.raises(ValueError):
        N.pack_stochastic_signs(x, 1.0, 1, 2**63 - 8)
    with pytest.raises(ValueError):
        N.pack_stochastic_signs(x, 1.0, 1, 2**80)
    assert N.pack_stochastic_signs(x, 1.0, -1) == N.pack_stochastic_signs(x, 1.0, 2**64 - 1)
    assert len(N.pack_stochastic_signs(x, 1.0, 2**200, 2**63 - 16)) == 2


def test_unpack_argument_errors():
    bits = bytes([0b1010_0101, 0xFF])
    out = np.empty(16, np.float32)
    assert N.unpack_signs(bits, 16, out, 2.0) is None
    assert out[:8].tolist() == [-2.0, 2.0, -2.0, 2.0, 2.0, -2.0, 2.0, -2.0]
    with pytest.raises(ValueError):
        N.unpack_signs(bits, 17, np.empty(17, np.float32))
    with pytest.raises(ValueError):
        N.unpack_signs(bits, -1, out)
    with pytest.raises(ValueError):
        N.unpack_signs(bits, 16, np.empty(15, np.float32))
    with pytest.raises(ValueError):
        N.unpack_signs(bits, 8, np.empty(16, np.float32)[::2])
    with pytest.raises(TypeError):
        N.unpack_signs(bits, 16, np.empty(16, np.float64))
    with pytest.raises(TypeError):
        N.unpack_signs(np.zeros(2, np.float32), 16, out)
    with pytest.raises(ValueError):
        N.unpack_signs(np.zeros(4, np.uint8)[::2], 16, out)
    with pytest.raises(ValueError):
        N.unpack_signs(bits, 16, np.empty(16, np.float32).tobytes())  # read-only bytes
    with pytest.raises(TypeError):
        N.unpack_signs(bits, 16, None)
    with pytest.raises(TypeError):
        N.unpack_signs(bits, 16, out, "2")
    shared = np.zeros(64, np.float32)
    with pytest.raises(ValueError):
        N.unpack_signs(shared.view(np.uint8)[:8], 16, shared)


def test_vote_argument_errors():
    rows = np.random.default_rng(0).integers(0, 256, (3, 4), dtype=np.uint8)
    out = np.empty(32, np.float32)
    assert N.vote(rows, 32, out) is None
    with pytest.raises(ValueError):
        N.vote(rows, 33, np.empty(33, np.float32))
    with pytest.raises(ValueError):
        N.vote(rows, 32, out, "average")
    with pytest.raises(ValueError):                  # the mean is of unweighted votes
        N.vote(rows, 32, out, "mean", np.ones(3, np.float32))
    with pytest.raises(ValueError):
        N.vote(rows, 32, np.empty(31, np.float32))
    with pytest.raises(TypeError):
        N.vote(rows, 32, np.empty(32, np.float16))
    with pytest.raises(ValueError):
        N.vote(rows, 32, np.empty(64, np.float32)[::2])
    with pytest.raises(ValueError):
        N.vote(rows, 32, np.empty(33, np.float32).view(np.uint8)[1:129].view(np.float32))
    with pytest.raises(TypeError):
        N.vote(rows.astype(np.int16), 32, out)
    with pytest.raises(ValueError):
        N.vote(np.asfortranarray(np.zeros((3, 4), np.uint8)), 32, out)
    with pytest.raises(ValueError):
        N.vote(rows[:0], 32, out)
    with pytest.raises(ValueError):
        N.vote(rows[None], 32, out)
    with pytest.raises(ValueError):
        N.vote(rows, 32, out, n_ranks=2)
    with pytest.raises(ValueError):
        N.vote(rows.reshape(-1), 32, out)  # 1-D needs n_ranks
    with pytest.raises(ValueError):
        N.vote(rows.reshape(-1), 32, out, n_ranks=5)
    with pytest.raises(ValueError):
        N.vote(rows.reshape(-1), 32, out, n_ranks=0)
    with pytest.raises(TypeError):
        N.vote(rows, 32, out, "sum", np.ones(3, np.float64))
    with pytest.raises(ValueError):
        N.vote(rows, 32, out, "sum", np.ones(4, np.float32))
    with pytest.raises(TypeError):
        N.vote(rows, 32, out, "sum", [1.0, 1.0, 1.0])
    big = np.zeros(256, np.float32)
    with pytest.raises(ValueError):
        N.vote(big.view(np.uint8)[:12].reshape(3, 4), 32, big)
    reversed_rows = rows[::-1]  # negative row stride is fine
    N.vote(reversed_rows, 32, out, "sum")
    assert np.array_equal(out, N_vote_reference(reversed_rows, 32))
    N.vote(np.broadcast_to(rows[:1], (5, 4)), 32, out, "sum")  # zero row stride too
    assert np.array_equal(out, N_vote_reference(np.repeat(rows[:1], 5, axis=0), 32))


def N_vote_reference(rows, n):
    signs = 1.0 - 2.0 * np.unpackbits(np.ascontiguousarray(rows), axis=1, bitorder="little")
    return signs[:, :n].sum(axis=0).astype(np.float32)


def test_isa_selection():
    names = N.available_isas()
    assert "portable" in names
    previous = N.set_isa("portable")
    try:
        assert N.isa() == "portable"
        with pytest.raises(ValueError):
            N.set_isa("sse9")
        assert N.isa() == "portable"
        assert N.set_isa("auto") == "portable"
        assert N.isa() == names[-1]
    finally:
        N.set_isa(previous)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(-5, 5), st.floats(), st.text(max_size=3),
                          st.sampled_from([b"", b"\x01\x02", bytearray(3), np.zeros(3, np.float32),
                                           np.zeros((2, 2), np.uint8), np.zeros(0, np.float16)])),
                max_size=6),
       st.sampled_from(["pack_signs", "pack_stochastic_signs", "unpack_signs", "vote"]))
def test_garbage_arguments_raise_cleanly(args, name):
    try:
        getattr(N, name)(*args)
    except (TypeError, ValueError, OverflowError):
        pass
