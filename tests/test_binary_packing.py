"""Bit layout v1 of 1-bit weights (slimformer.binary.packing) checked bit by bit, independently of
the packing code, plus the BWN binarization rule and the fp64 references' algebra."""
from __future__ import annotations

import pytest
import torch

from slimformer.binary.packing import (LAYOUT_VERSION, binarize_weight, check_packed, pack_signs, packed_shape,
                                       unpack_signs)
from slimformer.binary.reference import binary_linear_a1_reference, binary_linear_reference


@pytest.mark.parametrize("N,K", [(1, 1), (15, 31), (16, 32), (17, 33), (40, 100), (3, 577)])
def test_layout_bit_by_bit(N, K):
    positive = torch.rand(N, K) < 0.5
    q = pack_signs(positive)
    assert LAYOUT_VERSION == 1
    assert q.dtype == torch.int32 and tuple(q.shape) == packed_shape(N, K) == (-(-N // 16), -(-K // 32), 16)
    words = q.to(torch.int64) & 0xFFFFFFFF
    for n in range(q.shape[0] * 16):
        for k in range(q.shape[1] * 32):
            bit = int(words[n // 16, k // 32, n % 16]) >> (k % 32) & 1
            expected = int(positive[n, k]) if n < N and k < K else 0  # padding is 0
            assert bit == expected, (n, k)


@pytest.mark.parametrize("N,K", [(5, 7), (33, 65), (100, 384)])
def test_pack_unpack_round_trip(N, K):
    positive = torch.rand(N, K) < 0.3
    s = unpack_signs(pack_signs(positive), N, K)
    assert s.dtype == torch.float32
    assert torch.equal(s, positive.float() * 2 - 1)


def test_bwn_rule():
    w = torch.randn(6, 50, dtype=torch.float64) + 3.0  # a large mean: centring matters
    positive, alpha = binarize_weight(w)
    c = w - w.mean(1, keepdim=True)
    assert torch.equal(positive, c >= 0)
    torch.testing.assert_close(alpha, c.abs().mean(1).float())
    assert alpha.dtype == torch.float32


def test_references_agree_with_dense_algebra():
    N, K = 9, 70
    w = torch.randn(N, K)
    positive, alpha = binarize_weight(w)
    q = pack_signs(positive)
    s = positive.double() * 2 - 1
    x, bias = torch.randn(4, K), torch.randn(N)
    torch.testing.assert_close(binary_linear_reference(x, q, alpha, bias, K),
                               (x.double() @ (s * alpha.double()[:, None]).t() + bias).float())
    scale, shift = torch.tensor(0.7), torch.tensor(-0.2)
    xb = torch.where(x >= shift, 1.0, -1.0).double() * 0.7 - 0.2  # the binarized input
    torch.testing.assert_close(binary_linear_a1_reference(x, q, alpha, bias, scale, shift, K),
                               (xb @ (s * alpha.double()[:, None]).t() + bias).float())


def test_bad_packed_weights_raise():
    q = pack_signs(torch.ones(20, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="int32"):
        check_packed(q.to(torch.int64), 20, 40)
    with pytest.raises(ValueError, match=r"\(2, 2, 16\)"):
        unpack_signs(q, 40, 40)
    with pytest.raises(ValueError, match="positive"):
        packed_shape(0, 4)
    with pytest.raises(ValueError, match="2-D"):
        pack_signs(torch.ones(2, 3, 4, dtype=torch.bool))
