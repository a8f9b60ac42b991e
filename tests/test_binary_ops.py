"""torch.ops.slimformer.binary_gemm / binary_gemm_a1 on CPU against the fp64 references.

The ground truth is also computed from the random sign matrix itself (not only through
slimformer's unpack_signs), so a packing bug and a kernel bug cannot cancel out. How the CPU op
works (csrc/binary/binary_cpu_*.cpp): row tiles of 16 with a partial last tile, K in blocks of
16/32/64 words (W1A-fp AVX-512/AVX2), tokens in blocks of 4/2/1 (W1A-fp) or 8/4/2/1 x 2 tiles
(W1A1 AVX-512), byte counters widened every 31 words (W1A1 AVX2), lookup tables built in token
chunks of ~8 MiB; the cases cover the boundaries of these. All implementations add in the same
order, so scalar, AVX2 and AVX-512 agree bit for bit.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from slimformer import _C
from slimformer.binary.packing import pack_signs
from slimformer.binary.reference import binary_linear_a1_reference, binary_linear_reference
from slimformer.ops.binary import binary_gemm, binary_gemm_a1

ISAS = ["scalar", "avx2", "avx512vnni"]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-5, F16: 1e-2, BF16: 1e-2}
OP_ERRORS = (ValueError, RuntimeError)


def _weights(N, K, bias_dtype=None):
    pos = torch.rand(N, K) > 0.5
    alpha = torch.rand(N) + 0.25
    bias = torch.randn(N).to(bias_dtype) if bias_dtype is not None else None
    return pos, pack_signs(pos), alpha, bias


def _truth_fp(x, pos, alpha, bias):
    s = pos.double() * 2 - 1
    y = (x.double() @ s.t()) * alpha.double()
    return y + bias.double() if bias is not None else y


def _truth_a1(x, pos, alpha, bias, scale, shift):
    s = pos.double() * 2 - 1
    t = torch.where(x.float() >= shift, 1.0, -1.0).double()
    y = (scale * (t @ s.t()) + shift * s.sum(1)) * alpha.double()
    return y + bias.double() if bias is not None else y


def rel_err(y, ref):
    y, ref = y.double(), ref.double()
    return float(torch.linalg.vector_norm(y - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def _act_params(kind):
    if kind == "zero":
        return torch.tensor(0.5), torch.tensor(0.0)
    return torch.rand(()) * 2 + 0.1, torch.randn(()) * 0.5


# A covering set: every K x N of the awkward sizes, M cycling through 1, 3, 17, 33, 130, dtypes and
# biases cycling, plus cases for K blocks (K > 512 at M >= 4, K > 2048 at M = 1), token chunks of
# the tables (K = 4100: 128 tokens per chunk) and leading batch dims.
_MS = [1, 3, 17, 33, 130]
_DT = [F32, F16, BF16]
_BIAS = [None, F32, F16]
CASES = [
    pytest.param(dict(lead=(_MS[i % 5],), K=K, N=N, dt=_DT[i % 3], bias=_BIAS[(i // 3) % 3]),
                 id=f"M{_MS[i % 5]}-K{K}-N{N}-{str(_DT[i % 3])[6:]}-b{str(_BIAS[(i // 3) % 3])[6:]}")
    for i, (K, N) in enumerate(itertools.product([1, 31, 33, 100, 576, 1000], [1, 15, 17, 33, 100]))
] + [
    pytest.param(dict(lead=(1,), K=2100, N=40, dt=F32, bias=F32), id="M1-K2100-N40-kblocks"),
    pytest.param(dict(lead=(7,), K=1000, N=48, dt=F32, bias=None), id="M7-K1000-N48"),
    pytest.param(dict(lead=(130,), K=4100, N=20, dt=F32, bias=F16), id="M130-K4100-N20-tokenchunks"),
    pytest.param(dict(lead=(2, 3), K=100, N=17, dt=F32, bias=F32), id="M2x3-K100-N17-f32"),
    pytest.param(dict(lead=(2, 3), K=576, N=33, dt=F16, bias=F16), id="M2x3-K576-N33-f16"),
    pytest.param(dict(lead=(2, 1, 5), K=33, N=100, dt=BF16, bias=None), id="M2x1x5-K33-N100-bf16"),
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("c", CASES)
def test_binary_gemm_matches_reference(c, isa):
    pos, qw, alpha, bias = _weights(c["N"], c["K"], c["bias"])
    x = torch.randn(*c["lead"], c["K"]).to(c["dt"])
    y = binary_gemm(x, qw, alpha, c["K"], bias)
    assert y.dtype == c["dt"] and y.shape == (*c["lead"], c["N"])
    ref = binary_linear_reference(x, qw, alpha, bias, c["K"])
    assert rel_err(y, ref) <= TOL[c["dt"]]
    assert rel_err(y, _truth_fp(x, pos, alpha, bias)) <= TOL[c["dt"]]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("c", CASES)
@pytest.mark.parametrize("act", ["zero", "random"])
def test_binary_gemm_a1_matches_reference(c, act, isa):
    pos, qw, alpha, bias = _weights(c["N"], c["K"], c["bias"])
    x = torch.randn(*c["lead"], c["K"]).to(c["dt"])
    scale, shift = _act_params(act)
    y = binary_gemm_a1(x, qw, alpha, scale, shift, c["K"], bias)
    assert y.dtype == c["dt"] and y.shape == (*c["lead"], c["N"])
    ref = binary_linear_a1_reference(x, qw, alpha, bias, scale, shift, c["K"])
    assert rel_err(y, ref) <= TOL[c["dt"]]
    truth = _truth_a1(x, pos, alpha, bias, float(scale), float(shift))
    assert rel_err(y, truth) <= TOL[c["dt"]]


PARITY = [(1, 1, 1), (3, 33, 15), (7, 100, 17), (17, 1000, 33), (130, 576, 100), (5, 2100, 47), (1, 4100, 31),
          (9, 64, 16), (2, 300, 100), (1, 1000, 200)]  # the last two: 4-, 2- and 1-tile groups of the M < 4 path


@pytest.mark.parametrize("M,K,N", PARITY, ids=[f"M{m}-K{k}-N{n}" for m, k, n in PARITY])
@pytest.mark.parametrize("bias", [False, True])
def test_isa_parity_bitwise(M, K, N, bias, isa):
    """Scalar, AVX2 and AVX-512 add in the same order: identical fp32 results (both ops)."""
    _, qw, alpha, b = _weights(N, K, F32 if bias else None)
    x = torch.randn(M, K)
    scale, shift = _act_params("random")
    outs = {}
    for name in ISAS:
        isa(name)
        outs[name] = (binary_gemm(x, qw, alpha, K, b), binary_gemm_a1(x, qw, alpha, scale, shift, K, b),
                      binary_gemm_a1(x, qw, alpha, scale, torch.tensor(0.0), K, b))
    for name in ISAS[1:]:
        for got, want in zip(outs[name], outs["scalar"]):
            assert torch.equal(got, want), name


def test_a1_integer_dot_is_exact():
    """alpha = scale = 1, shift = 0, no bias: the output is the exact +-1 dot product."""
    N, K = 37, 1000
    pos, qw, _, _ = _weights(N, K)
    x = torch.randn(11, K)
    x[:, ::7] = 0.0  # x == shift counts as +1
    y = binary_gemm_a1(x, qw, torch.ones(N), torch.tensor(1.0), torch.tensor(0.0), K)
    s = pos.long() * 2 - 1
    t = torch.where(x >= 0, 1, -1).long()
    assert torch.equal(y.long(), t @ s.t())
    assert torch.equal(y, y.round())


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("w_sign,x_sign", [(1, 1), (1, -1), (-1, 1), (-1, -1)])
def test_extreme_bit_patterns(w_sign, x_sign, isa):
    """All weight bits equal and all activations on one side: every XOR bit set or clear, so the
    popcount counters reach their maxima (AVX2 byte counters: 31 words x 8 bits per byte)."""
    N, K = 33, 2100
    pos = torch.full((N, K), w_sign > 0)
    qw, alpha = pack_signs(pos), torch.rand(N) + 0.25
    x = x_sign * (torch.rand(5, K) + 0.5)
    y = binary_gemm_a1(x, qw, alpha, torch.tensor(1.0), torch.tensor(0.0), K)
    assert torch.equal(y, alpha.expand(5, N) * float(w_sign * x_sign * K))
    y = binary_gemm(x, qw, alpha, K)
    assert rel_err(y, _truth_fp(x, pos, alpha, None)) <= 1e-5


def test_a1_shift_ties_and_nan():
    """t = +1 iff x >= shift: equal values count as +1, NaN as -1 (as the reference)."""
    N, K = 20, 70
    _, qw, alpha, _ = _weights(N, K)
    shift = torch.tensor(0.25)
    x = torch.randn(4, K)
    x[0, :10] = 0.25
    x[1, 3] = float("nan")
    y = binary_gemm_a1(x, qw, alpha, torch.tensor(0.5), shift, K)
    ref = binary_linear_a1_reference(x, qw, alpha, None, torch.tensor(0.5), shift, K)
    assert rel_err(y, ref) <= 1e-6


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batch(lead):
    _, qw, alpha, bias = _weights(17, 40, F32)
    x = torch.randn(*lead, 40)
    assert binary_gemm(x, qw, alpha, 40, bias).shape == (*lead, 17)
    assert binary_gemm_a1(x, qw, alpha, torch.tensor(1.0), torch.tensor(0.0), 40, bias).shape == (*lead, 17)


def test_non_contiguous_inputs():
    pos, qw, alpha, bias = _weights(33, 100, F32)
    x = torch.randn(100, 5).t()  # non-contiguous (5, 100)
    qw_nc = qw.transpose(0, 1).contiguous().transpose(0, 1)
    y = binary_gemm(x, qw_nc, alpha, 100, bias)
    assert rel_err(y, _truth_fp(x, pos, alpha, bias)) <= 1e-5
    y1 = binary_gemm_a1(x, qw_nc, alpha, torch.tensor(0.5), torch.tensor(0.1), 100, bias)
    assert rel_err(y1, _truth_a1(x, pos, alpha, bias, 0.5, 0.1)) <= 1e-5


def test_act_params_with_one_element_accepted():
    pos, qw, alpha, _ = _weights(16, 32)
    x = torch.randn(3, 32)
    y = binary_gemm_a1(x, qw, alpha, torch.tensor([0.5]), torch.tensor([[0.1]]), 32)
    assert rel_err(y, _truth_a1(x, pos, alpha, None, 0.5, 0.1)) <= 1e-6


# -- opcheck and torch.compile --------------------------------------------------------------------
def _op_args(M=3, K=100, N=33, bias=True):
    _, qw, alpha, b = _weights(N, K, F32 if bias else None)
    return torch.randn(M, K), qw, alpha, b, K


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dt", [F32, BF16])
def test_opcheck_binary_gemm(bias, dt):
    x, qw, alpha, b, K = _op_args(bias=bias)
    torch.library.opcheck(torch.ops.slimformer.binary_gemm.default, (x.to(dt), qw, alpha, b, K))


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_binary_gemm_a1(bias):
    x, qw, alpha, b, K = _op_args(bias=bias)
    args = (x, qw, alpha, b, torch.tensor(0.7), torch.tensor(0.2), K)
    torch.library.opcheck(torch.ops.slimformer.binary_gemm_a1.default, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    pos, qw, alpha, bias = _weights(40, 96, F32)
    scale, shift = torch.tensor(0.5), torch.tensor(0.1)

    def f(x):
        h = binary_gemm(x, qw, alpha, 96, bias)
        return torch.relu(h) + binary_gemm_a1(x, qw, alpha, scale, shift, 96, bias)

    x = torch.randn(2, 5, 96)
    y = torch.compile(f, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(y, f(x))
    want = torch.relu(_truth_fp(x, pos, alpha, bias)) + _truth_a1(x, pos, alpha, bias, 0.5, 0.1)
    assert rel_err(y, want) <= 1e-5


# -- bad input ------------------------------------------------------------------------------------
@pytest.fixture
def good():
    _, qw, alpha, bias = _weights(40, 100, F32)
    return dict(x=torch.randn(3, 100), qweight=qw, alpha=alpha, bias=bias, act_scale=torch.tensor(0.5),
                act_shift=torch.tensor(0.1), in_features=100)


def _call(a, op):
    if op == "fp":
        return torch.ops.slimformer.binary_gemm(a["x"], a["qweight"], a["alpha"], a["bias"], a["in_features"])
    return torch.ops.slimformer.binary_gemm_a1(a["x"], a["qweight"], a["alpha"], a["bias"], a["act_scale"],
                                               a["act_shift"], a["in_features"])


@pytest.mark.parametrize("op", ["fp", "a1"])
def test_good_case_runs(good, op):
    assert _call(good, op).shape == (3, 40)


BAD = {
    "qweight_float": (lambda a: a.update(qweight=a["qweight"].float()), r"qweight must be int32.*Float"),
    "qweight_int64": (lambda a: a.update(qweight=a["qweight"].long()), r"qweight must be int32"),
    "qweight_2d": (lambda a: a.update(qweight=a["qweight"].reshape(3, -1)), r"qweight must have shape \(3, 4, 16\)"),
    "qweight_tiles": (lambda a: a.update(qweight=a["qweight"][:2]), r"qweight must have shape \(3, 4, 16\).*\[2, 4, 16\]"),
    "qweight_words": (lambda a: a.update(qweight=a["qweight"][:, :3]), r"qweight must have shape \(3, 4, 16\)"),
    "in_features_mismatch": (lambda a: a.update(in_features=99), r"x's last dimension must be in_features=99"),
    "in_features_zero": (lambda a: a.update(in_features=0), r"in_features must be positive"),
    "in_features_negative": (lambda a: a.update(in_features=-5), r"in_features must be positive"),
    "x_int": (lambda a: a.update(x=a["x"].to(torch.int32)), r"x must be float32, float16 or bfloat16.*Int"),
    "x_float64": (lambda a: a.update(x=a["x"].double()), r"x must be float32, float16 or bfloat16"),
    "x_0d": (lambda a: a.update(x=torch.tensor(1.0)), r"x's last dimension"),
    "alpha_fp16": (lambda a: a.update(alpha=a["alpha"].half()), r"alpha must be a non-empty 1-D float32.*Half"),
    "alpha_2d": (lambda a: a.update(alpha=a["alpha"].reshape(2, 20)), r"alpha must be a non-empty 1-D float32"),
    "alpha_length": (lambda a: a.update(alpha=a["alpha"][:30]), r"qweight must have shape \(2, 4, 16\).*out_features=30"),
    "bias_shape": (lambda a: a.update(bias=torch.randn(41)), r"bias must have shape \(40\)"),
    "bias_2d": (lambda a: a.update(bias=torch.randn(1, 40)), r"bias must have shape \(40\)"),
    "bias_int": (lambda a: a.update(bias=torch.zeros(40, dtype=torch.int32)), r"bias must be floating point"),
}
BAD_A1 = {
    "act_scale_shape": (lambda a: a.update(act_scale=torch.ones(2)), r"act_scale must be a float32 tensor with one element"),
    "act_scale_dtype": (lambda a: a.update(act_scale=torch.tensor(0.5, dtype=torch.float64)), r"act_scale must be a float32.*Double"),
    "act_shift_shape": (lambda a: a.update(act_shift=torch.zeros(0)), r"act_shift must be a float32 tensor with one element"),
    "act_shift_dtype": (lambda a: a.update(act_shift=torch.tensor(1, dtype=torch.int32)), r"act_shift must be a float32"),
}


@pytest.mark.parametrize("op", ["fp", "a1"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(name, op, good):
    mutate, message = BAD[name]
    mutate(good)
    with pytest.raises(OP_ERRORS, match=message):
        _call(good, op)


@pytest.mark.parametrize("name", list(BAD_A1))
def test_bad_act_params_raise(name, good):
    mutate, message = BAD_A1[name]
    mutate(good)
    with pytest.raises(OP_ERRORS, match=message):
        _call(good, "a1")


@pytest.mark.parametrize("which", ["qweight", "alpha", "bias", "act_scale"])
def test_mixed_meta_device_raises(which, good):
    """No second real device here: a meta tensor mixed with CPU tensors reaches the device checks."""
    good[which] = good[which].to("meta")
    for op in (["a1"] if which == "act_scale" else ["fp", "a1"]):
        with pytest.raises(OP_ERRORS, match="device|meta"):
            _call(good, op)
