"""slimformer.nn.QuantLinear: checkpoint buffers, state_dict round trips, act-order, dtype casts,
from_linear (RTN), torch.compile, and constructor / post_init errors."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from slimformer.gptq import dequantize_reference, gptq_linear_reference, unpack_cols, zero_offset
from slimformer.nn import QuantLinear

CHECKPOINT_KEYS = {"qweight", "qzeros", "scales", "g_idx", "bias"}


def _from_linear(K, N, bits, gs, *, act_order=False, bias=True, fmt="gptq", sym=False, helpers=None):
    """QuantLinear on an RTN grid; with act_order a GPTQ-style permuted g_idx and explicit grid."""
    lin = nn.Linear(K, N, bias=bias)
    if not act_order:
        return lin, QuantLinear.from_linear(lin, bits, gs, checkpoint_format=fmt, sym=sym)
    gsz = K if gs == -1 else gs
    g_idx, _ = helpers.act_order_g_idx(K, gsz)
    G = math.ceil(K / gsz)
    scales = torch.rand(G, N) * 0.01 + 0.002
    zeros = torch.randint(zero_offset(fmt), 1 << bits, (G, N))
    return lin, QuantLinear.from_linear(lin, bits, gs, scales=scales, zeros=zeros, g_idx=g_idx, checkpoint_format=fmt)


def _ref(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """fp64 reference from the module's checkpoint tensors (original, possibly unsorted g_idx)."""
    return gptq_linear_reference(x, mod.qweight, mod.qzeros, mod.scales, mod.g_idx, mod.bias, mod.bits,
                                 mod.zero_offset)


# -- buffers and state_dict -------------------------------------------------------------------

@pytest.mark.parametrize("K,N,bits,gs,bias", [
    (576, 100, 4, 128, True),
    (96, 33, 3, 32, False),
    (80, 7, 2, -1, True),
    (52, 30, 8, 100, True),
])
def test_checkpoint_buffers(K, N, bits, gs, bias):
    m = QuantLinear(K, N, bits, gs, bias=bias)
    G = 1 if gs == -1 else math.ceil(K / gs)
    sd = m.state_dict()
    assert set(sd) == (CHECKPOINT_KEYS if bias else CHECKPOINT_KEYS - {"bias"})
    assert sd["qweight"].shape == (K * bits // 32, N) and sd["qweight"].dtype == torch.int32
    assert sd["qzeros"].shape == (G, math.ceil(N * bits / 32)) and sd["qzeros"].dtype == torch.int32
    assert sd["scales"].shape == (G, N) and sd["scales"].dtype == torch.float16
    assert sd["g_idx"].shape == (K,) and sd["g_idx"].dtype == torch.int32
    assert torch.equal(sd["g_idx"], (torch.arange(K) // (K if gs == -1 else gs)).to(torch.int32))
    if bias:
        assert sd["bias"].shape == (N,) and sd["bias"].dtype == torch.float16
    else:
        assert m.bias is None


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("K,N,bits,gs,fmt", [
    (256, 48, 4, 64, "gptq"),
    (96, 40, 3, 32, "gptq_v2"),
    (144, 21, 2, 48, "gptq"),
    (100, 36, 8, -1, "gptq_v2"),
])
def test_state_dict_round_trip(K, N, bits, gs, fmt, act_order, helpers):
    _, src = _from_linear(K, N, bits, gs, act_order=act_order, fmt=fmt, helpers=helpers)
    sd = src.state_dict()
    assert set(sd) == CHECKPOINT_KEYS
    # through a serialized checkpoint, as plain tensors
    buf = io.BytesIO()
    torch.save({k: v.clone() for k, v in sd.items()}, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    dst = QuantLinear(K, N, bits, gs, checkpoint_format=fmt)
    dst.load_state_dict(loaded)  # strict: exactly the checkpoint keys
    assert (dst._perm is not None) == (act_order and gs != -1)  # one group: g_idx is all zeros, sorted
    for k in CHECKPOINT_KEYS:
        assert torch.equal(getattr(dst, k), sd[k]) and getattr(dst, k).dtype == sd[k].dtype
    for shape in [(1, K), (5, K), (20, K)]:
        x = torch.randn(shape)
        assert torch.equal(dst(x), src(x))


def test_state_dict_round_trip_safetensors(helpers, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    _, src = _from_linear(128, 24, 4, 32, act_order=True, helpers=helpers)
    path = tmp_path / "layer.safetensors"
    safetensors.save_file(src.state_dict(), str(path))
    dst = QuantLinear(128, 24, 4, 32)
    dst.load_state_dict(safetensors.load_file(str(path)))
    x = torch.randn(3, 128)
    assert torch.equal(dst(x), src(x))


def test_load_state_dict_strict_keys():
    m = QuantLinear(64, 16, 4, 32)
    sd = m.state_dict()
    sd.pop("g_idx")
    with pytest.raises(RuntimeError, match="g_idx"):
        QuantLinear(64, 16, 4, 32).load_state_dict(sd)


# -- numerics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("K,N,bits,gs,fmt,M", [
    (576, 100, 4, 128, "gptq", 1),
    (576, 100, 4, 128, "gptq_v2", 17),
    (288, 70, 3, 64, "gptq", 3),
    (4160, 24, 3, 128, "gptq", 33),
    (336, 31, 2, 100, "gptq_v2", 7),
    (300, 45, 8, 64, "gptq", 130),
])
def test_act_order_matches_reference_with_original_g_idx(K, N, bits, gs, fmt, M, helpers):
    _, m = _from_linear(K, N, bits, gs, act_order=True, fmt=fmt, helpers=helpers)
    assert not bool((m.g_idx[1:] >= m.g_idx[:-1]).all())  # really unsorted
    assert m._perm is not None
    x = torch.randn(M, K)
    err = helpers.rel_err(m(x), _ref(m, x))
    assert err <= 1e-5, err


@pytest.mark.parametrize("xdt,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("act_order", [False, True])
def test_forward_dtypes(xdt, tol, act_order, helpers):
    _, m = _from_linear(192, 40, 4, 64, act_order=act_order, helpers=helpers)
    x = torch.randn(4, 192).to(xdt)
    y = m(x)
    assert y.dtype == xdt
    assert helpers.rel_err(y, _ref(m, x)) <= tol


def test_v1_and_v2_give_the_same_layer():
    lin = nn.Linear(128, 40)
    v1 = QuantLinear.from_linear(lin, 4, 32, checkpoint_format="gptq")
    v2 = QuantLinear.from_linear(lin, 4, 32, checkpoint_format="gptq_v2")
    assert torch.equal(unpack_cols(v1.qzeros, 4, 40) + 1, unpack_cols(v2.qzeros, 4, 40))
    x = torch.randn(3, 128)
    assert torch.equal(v1(x), v2(x))


@pytest.mark.parametrize("fmt,stored", [("gptq", 7), ("gptq_v2", 8)])
def test_symmetric_zeros(fmt, stored):
    m = QuantLinear.from_linear(nn.Linear(64, 24), 4, 32, checkpoint_format=fmt, sym=True)
    assert torch.equal(unpack_cols(m.qzeros, 4, 24), torch.full((2, 24), stored))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", [128, -1])
def test_from_linear_rtn_8bit_close_to_linear(sym, gs):
    lin = nn.Linear(576, 300)
    m = QuantLinear.from_linear(lin, 8, gs, sym=sym)
    x = torch.randn(6, 576)
    y_ref = lin(x).detach()
    err = float((m(x) - y_ref).norm() / y_ref.norm())
    assert err <= 1e-2, err
    # rounding to nearest: within half a grid step of the original, plus a little for the fp16
    # rounding of the scales (measured <= 0.56 steps)
    W = dequantize_reference(m.qweight, m.qzeros, m.scales, m.g_idx, 8, m.zero_offset)
    step = m.scales.double()[m.g_idx.long()]
    assert float(((W - lin.weight.detach().double().t()).abs() / step).max()) <= 0.75


@pytest.mark.parametrize("bits,tol", [(4, 0.15), (3, 0.3)])
def test_from_linear_rtn_low_bits_reasonable(bits, tol):
    lin = nn.Linear(256, 64)
    m = QuantLinear.from_linear(lin, bits, 32)
    x = torch.randn(5, 256)
    y_ref = lin(x).detach()
    assert float((m(x) - y_ref).norm() / y_ref.norm()) <= tol


def test_from_linear_given_grid_is_exact():
    """With an explicit grid and weights on it, from_linear reproduces the weights exactly."""
    K, N, bits, gs = 128, 16, 4, 32
    scales = (torch.rand(K // gs, N) * 0.01 + 0.001).to(torch.float16)
    zeros = torch.randint(1, 16, (K // gs, N))
    q = torch.randint(0, 16, (K, N))
    g = torch.arange(K) // gs
    W = scales.double()[g] * (q - zeros[g])
    lin = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W.t().float())
    m = QuantLinear.from_linear(lin, bits, gs, scales=scales.float(), zeros=zeros)
    assert torch.equal(dequantize_reference(m.qweight, m.qzeros, m.scales, m.g_idx, bits, 1), W)


@pytest.mark.parametrize("shape", [(64,), (1, 64), (2, 3, 64), (2, 1, 3, 64), (0, 64), (3, 0, 64)])
def test_any_leading_shape(shape, helpers):
    _, m = _from_linear(64, 24, 4, 32, act_order=True, helpers=helpers)
    x = torch.randn(shape)
    y = m(x)
    assert y.shape == (*shape[:-1], 24)
    if x.numel():
        assert helpers.rel_err(y, _ref(m, x)) <= 1e-5


def test_noncontiguous_x(helpers):
    _, m = _from_linear(64, 24, 4, 32, helpers=helpers)
    x = torch.randn(64, 7).t()
    assert helpers.rel_err(m(x), _ref(m, x)) <= 1e-5


# -- dtype / device casts ---------------------------------------------------------------------

def test_to_bfloat16_keeps_scales_fp16_and_runs(helpers):
    _, m = _from_linear(128, 40, 4, 32, act_order=True, helpers=helpers)
    qweight, g_idx = m.qweight.clone(), m.g_idx.clone()
    x = torch.randn(3, 128)
    ref = _ref(m, x)
    m.to(torch.bfloat16)
    assert m.scales.dtype == torch.float16
    assert m.qweight.dtype == torch.int32 and m.qzeros.dtype == torch.int32 and m.g_idx.dtype == torch.int32
    assert torch.equal(m.qweight, qweight) and torch.equal(m.g_idx, g_idx)
    y = m(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert helpers.rel_err(y, ref) <= 1e-2


@pytest.mark.parametrize("scale_dtype,cast", [
    (torch.float16, lambda m: m.to(torch.bfloat16)),
    (torch.float16, lambda m: m.bfloat16()),
    (torch.float16, lambda m: nn.Sequential(m).to(torch.bfloat16)),
], ids=["to(bfloat16)", "bfloat16()", "parent.to(bfloat16)"])
def test_dtype_cast_keeps_scale_values(scale_dtype, cast):
    m = QuantLinear(128, 40, 4, 32, dtype=scale_dtype)
    with torch.no_grad():
        m.scales.copy_(torch.rand(4, 40) * 0.01 + 1e-3)
    m.post_init()
    before = m.scales.clone()
    cast(m)
    assert m.scales.dtype == scale_dtype
    assert torch.equal(m.scales, before)


def test_float_and_half_casts_run():
    m = QuantLinear.from_linear(nn.Linear(64, 16), 4, 32)
    x = torch.randn(2, 64)
    y = m(x)
    for cast in (m.float, m.half, m.double):
        cast()
        assert m.scales.dtype == torch.float16
    assert m(x).dtype == torch.float32
    assert torch.allclose(m(x), y, rtol=1e-3, atol=1e-3)


def test_bfloat16_scales_module(helpers):
    m = QuantLinear(64, 24, 4, 32, dtype=torch.bfloat16)
    assert m.scales.dtype == torch.bfloat16 and m.bias.dtype == torch.bfloat16
    with torch.no_grad():
        m.scales.copy_(torch.rand(2, 24) * 0.1)
        m.qweight.copy_(torch.randint(-(2**31), 2**31 - 1, m.qweight.shape, dtype=torch.int64).to(torch.int32))
        m.bias.copy_(torch.randn(24))
    m.post_init()
    x = torch.randn(3, 64)
    assert helpers.rel_err(m(x), _ref(m, x)) <= 1e-5


def test_extra_repr(helpers):
    m = QuantLinear(576, 1536, 4, 128)
    assert m.extra_repr() == ("in_features=576, out_features=1536, bits=4, group_size=128, bias=True, "
                              "checkpoint_format='gptq', act_order=False")
    assert "QuantLinear(in_features=576" in repr(m)
    _, a = _from_linear(96, 8, 3, 32, act_order=True, bias=False, fmt="gptq_v2", helpers=helpers)
    assert a.extra_repr() == ("in_features=96, out_features=8, bits=3, group_size=32, bias=False, "
                              "checkpoint_format='gptq_v2', act_order=True")


# -- torch.compile ----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
def test_torch_compile_fullgraph_matches_eager(helpers):
    torch._dynamo.reset()
    _, q1 = _from_linear(128, 96, 4, 32, helpers=helpers)
    _, q2 = _from_linear(96, 40, 3, 32, act_order=True, helpers=helpers)
    model = nn.Sequential(q1, nn.GELU(), q2).eval()
    compiled = torch.compile(model, fullgraph=True)
    for shape in [(5, 128), (2, 3, 128)]:
        x = torch.randn(shape)
        with torch.no_grad():
            eager = model(x)
            out = compiled(x)
        assert out.shape == eager.shape and out.dtype == eager.dtype
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(in_features=64, out_features=16, bits=5, group_size=32), r"unsupported bits=5"),
    (dict(in_features=64, out_features=16, bits=16, group_size=32), r"unsupported bits=16"),
    (dict(in_features=64, out_features=16, bits=4, group_size=0), r"group_size must be positive or -1"),
    (dict(in_features=64, out_features=16, bits=4, group_size=-2), r"group_size must be positive or -1"),
    (dict(in_features=48, out_features=16, bits=3, group_size=32), r"in_features=48 must be a positive multiple of 32"),
    (dict(in_features=12, out_features=16, bits=4, group_size=32), r"in_features=12 must be a positive multiple of 8"),
    (dict(in_features=0, out_features=16, bits=4, group_size=32), r"in_features=0 must be a positive multiple"),
    (dict(in_features=64, out_features=0, bits=4, group_size=32), r"out_features must be positive"),
    (dict(in_features=64, out_features=16, bits=4, group_size=32, checkpoint_format="awq"),
     r"unknown checkpoint_format='awq'"),
])
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantLinear(**kwargs)


def test_post_init_g_idx_out_of_range():
    m = QuantLinear(64, 16, 4, 32)
    m.g_idx[5] = 2  # only 2 groups
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 2\)"):
        m.post_init()
    m.g_idx[5] = -1
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 2\)"):
        m.post_init()


def test_post_init_g_idx_wrong_shape():
    m = QuantLinear(64, 16, 4, 32)
    m.g_idx = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"g_idx must be \(64,\)"):
        m.post_init()


def test_load_state_dict_validates_g_idx():
    sd = QuantLinear(64, 16, 4, 32).state_dict()
    sd["g_idx"] = sd["g_idx"].clone()
    sd["g_idx"][0] = 7
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 2\)"):
        QuantLinear(64, 16, 4, 32).load_state_dict(sd)


def test_load_state_dict_shape_mismatch():
    sd = QuantLinear(64, 16, 4, 32).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for qzeros"):
        QuantLinear(64, 16, 4, 16).load_state_dict(sd)


def test_from_linear_errors():
    lin = nn.Linear(64, 16)
    with pytest.raises(ValueError, match=r"scales and zeros must both be \(groups, 16\)"):
        QuantLinear.from_linear(lin, 4, 32, scales=torch.ones(2, 15), zeros=torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"zeros must lie in \[1, 16\).*'gptq'"):
        QuantLinear.from_linear(lin, 4, 32, scales=torch.ones(2, 16), zeros=torch.zeros(2, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"zeros must lie in \[0, 16\)"):
        QuantLinear.from_linear(lin, 4, 32, scales=torch.ones(2, 16), zeros=torch.full((2, 16), 16),
                                checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match="in_features=60"):
        QuantLinear.from_linear(nn.Linear(60, 16), 4, 32)


def test_forward_bad_x():
    m = QuantLinear.from_linear(nn.Linear(64, 16), 4, 32)
    with pytest.raises((ValueError, RuntimeError), match="x's last dimension must be in_features=64"):
        m(torch.randn(2, 63))
    with pytest.raises((ValueError, RuntimeError), match="x must be float32, float16 or bfloat16"):
        m(torch.ones(2, 64, dtype=torch.int64))


def test_from_linear_rtn_handles_one_signed_groups_and_zero_rows():
    """Default RTN grid: a group with no negative weight (zero point 0, which v1 cannot store) and
    an all-zero output row both quantize, in both checkpoint formats."""
    lin = torch.nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight[2, :32] = lin.weight[2, :32].abs()
        lin.weight[3].zero_()
    x = torch.randn(4, 64)
    for fmt in ("gptq", "gptq_v2"):
        for sym in (False, True):
            q = QuantLinear.from_linear(lin, 4, 32, checkpoint_format=fmt, sym=sym)
            assert (q.scales > 0).all()
            y = q(x)
            assert torch.isfinite(y).all()
            err = (y - lin(x)).norm() / lin(x).norm()
            assert err < 0.2, (fmt, sym, float(err))
