"""The payload format: lengths by formula, round trips, and clear errors for bad payloads."""
import pytest
import torch

from hvd_signsgd import wire
from hvd_signsgd.codecs import Layout, ScaledSign, Sign


def round4(n):
    return (n + 3) // 4 * 4


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 65, 1001])
def test_sign_payload_length_formula(n):
    msg = Sign().encode(torch.randn(n))
    assert msg.numel() == wire.HEADER_NBYTES + round4((n + 7) // 8)


def test_scaled_sign_payload_carries_one_scale_per_tensor():
    layout = Layout.for_sizes([5, 3, 17])
    x = torch.randn(layout.numel)
    msg = ScaledSign().encode(x, layout, ScaledSign.scales(x, layout))
    assert layout.numel == 8 + 8 + 17
    assert msg.numel() == wire.HEADER_NBYTES + 4 * 3 + round4((layout.numel + 7) // 8)


def test_split_payloads_of_different_lengths_in_rank_order():
    a = wire.build(wire.Header("fp32", 3), body=torch.tensor([1.0, 2.0, 3.0]))
    b = wire.build(wire.Header("fp32", 3, flags=wire.FLAG_NONFINITE))
    parts = wire.split(torch.cat([a, b]), 2, bucket="b0", codec="fp32", n=3)
    assert [p.rank for p in parts] == [0, 1]
    assert parts[0].body.view(torch.float32).tolist() == [1.0, 2.0, 3.0]
    assert parts[1].header.flags & wire.FLAG_NONFINITE and parts[1].body.numel() == 0


def test_split_rejects_a_rank_with_another_model():
    a = Sign().encode(torch.randn(10))
    b = Sign().encode(torch.randn(11))
    with pytest.raises(wire.PayloadError, match="rank 1 sent bucket b0 .* 11 elements"):
        wire.split(torch.cat([a, b]), 2, bucket="b0", codec="sign", n=10)


def test_split_rejects_truncated_and_garbage_payloads():
    a = Sign().encode(torch.randn(100))
    with pytest.raises(wire.PayloadError, match="truncated"):
        wire.split(a[:-4], 1, bucket="b0", codec="sign", n=100)
    garbage = torch.full((32,), 255, dtype=torch.uint8)
    with pytest.raises(wire.PayloadError, match="unknown format"):
        wire.split(garbage, 1, bucket="b0", codec="sign", n=100)
    with pytest.raises(wire.PayloadError, match="trailing"):
        wire.split(torch.cat([a, torch.zeros(4, dtype=torch.uint8)]), 1, bucket="b0",
                   codec="sign", n=100)
