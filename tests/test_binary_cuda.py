"""torch.ops.slimformer.binary_gemm / binary_gemm_a1 on CUDA against the fp64 references.

Paths of the CUDA adapter (csrc/binary/binary_cuda_op.cpp): binary_gemm with M <= 64 runs the fused
gemv kernel (token tiles 1/2/4/8, K split across blocks with an fp32 workspace when the row tiles
are few), larger M unpacks S to +-1 and calls cuBLAS; binary_gemm_a1 packs the activation bits
(ballot) and runs the popcount GEMM. All tests are marked ``cuda`` and skip without a GPU; the
kernels' index and bit math is tested on the CPU in test_binary_cuda_math.py.
"""
from __future__ import annotations

import pytest
import torch

from slimformer import _C
from slimformer.binary import pack_signs
from slimformer.binary.reference import binary_linear_a1_reference, binary_linear_reference
from slimformer.ops import binary_gemm, binary_gemm_a1

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _C.has_cuda_kernels, reason="slimformer was built without CUDA kernels"),
]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-5, F16: 1e-2, BF16: 1e-2}
CUDA = "cuda"
OP_ERRORS = (ValueError, RuntimeError)
MS = [1, 3, 17, 33, 130]
KS = [1, 31, 33, 100, 576, 1000]
NS = [1, 15, 17, 33, 100]


def rel_err(y, ref):
    y, ref = y.double().cpu(), ref.double().cpu()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-300))


def make(N, K, bias_dtype=None):
    qw = pack_signs(torch.rand(N, K) < 0.5)
    alpha = torch.rand(N) + 0.25
    bias = torch.randn(N).to(bias_dtype) if bias_dtype is not None else None
    return qw, alpha, bias


def cuda(*ts):
    return [t.to(CUDA) if t is not None else None for t in ts]


@pytest.mark.parametrize("xdt", [F32, F16, BF16])
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("M", MS)
def test_binary_gemm_matches_fp64(M, K, N, xdt):
    qw, alpha, bias = make(N, K, F32 if (M + K + N) % 2 else BF16)
    x = torch.randn(M, K).to(xdt)
    y = binary_gemm(*cuda(x, qw, alpha), K, bias=cuda(bias)[0])
    assert y.device.type == CUDA and y.dtype == xdt and y.shape == (M, N)
    assert rel_err(y, binary_linear_reference(x, qw, alpha, bias, K)) <= TOL[xdt]


@pytest.mark.parametrize("xdt", [F32, F16, BF16])
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("M", MS)
def test_binary_gemm_a1_matches_fp64(M, K, N, xdt):
    qw, alpha, bias = make(N, K, F16 if (M + N) % 2 else None)
    x = torch.randn(M, K).to(xdt)
    x[:, ::5] = 0.25  # exactly at the shift: +1
    scale, shift = torch.tensor(0.5), torch.tensor(0.25)
    y = binary_gemm_a1(*cuda(x, qw, alpha, scale, shift), K, bias=cuda(bias)[0])
    assert y.device.type == CUDA and y.dtype == xdt and y.shape == (M, N)
    ref = binary_linear_a1_reference(x, qw, alpha, bias, scale, shift, K)
    assert rel_err(y, ref) <= (1e-6 if xdt == F32 else TOL[xdt])


@pytest.mark.parametrize("M", list(range(1, 18)) + [63, 64, 65])
def test_binary_gemm_every_token_tile_and_the_cublas_switch(M):
    K, N = 576, 203
    qw, alpha, bias = make(N, K, F32)
    x = torch.randn(M, K)
    y = binary_gemm(*cuda(x, qw, alpha), K, bias=cuda(bias)[0])
    assert rel_err(y, binary_linear_reference(x, qw, alpha, bias, K)) <= TOL[F32]


@pytest.mark.parametrize("M", [1, 5])
def test_binary_gemm_split_k_and_host_replay(M):
    """Small N with large K: split-K through the fp32 workspace; agrees with the host replay."""
    K, N = 8192 + 7, 20
    qw, alpha, bias = make(N, K, F32)
    x = torch.randn(M, K)
    y = binary_gemm(*cuda(x, qw, alpha), K, bias=cuda(bias)[0]).cpu()
    assert rel_err(y, binary_linear_reference(x, qw, alpha, bias, K)) <= TOL[F32]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert _C._test_binary_cuda_plan_gemv(M, N, K, sms)[3] > 1
    replay = _C._test_binary_cuda_emulate_gemv(qw.numpy(), alpha.numpy(), bias.numpy(), x.numpy(), K, sms)
    assert rel_err(y, torch.from_numpy(replay)) <= 1e-6


def test_binary_gemm_one_split_bit_identical_to_host_replay():
    K, N, M = 1000, 100, 3
    qw, alpha, bias = make(N, K, F32)
    x = torch.randn(M, K)
    y = binary_gemm(*cuda(x, qw, alpha), K, bias=cuda(bias)[0]).cpu()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert _C._test_binary_cuda_plan_gemv(M, N, K, sms)[3] == 1
    replay = _C._test_binary_cuda_emulate_gemv(qw.numpy(), alpha.numpy(), bias.numpy(), x.numpy(), K, sms)
    assert torch.equal(y, torch.from_numpy(replay))


def test_binary_gemm_a1_bit_identical_to_host_replay():
    K, N, M = 1000, 100, 70
    qw, alpha, bias = make(N, K, F32)
    x = torch.randn(M, K)
    y = binary_gemm_a1(*cuda(x, qw, alpha, torch.tensor(0.3), torch.tensor(-0.1)), K, bias=cuda(bias)[0]).cpu()
    replay = _C._test_binary_cuda_emulate_gemm_a1(qw.numpy(), alpha.numpy(), bias.numpy(), x.numpy(), 0.3, -0.1, K)
    assert torch.equal(y, torch.from_numpy(replay))


@pytest.mark.parametrize("M", [1, 16, 300])
@pytest.mark.parametrize("xdt", [F16, BF16, F32])
def test_large_4096x4096(M, xdt):
    K = N = 4096
    qw, alpha, bias = make(N, K, xdt)
    x = torch.randn(M, K).to(xdt)
    y = binary_gemm(*cuda(x, qw, alpha), K, bias=cuda(bias)[0])
    assert rel_err(y, binary_linear_reference(x, qw, alpha, bias, K)) <= TOL[xdt]
    scale, shift = torch.tensor(0.02), torch.tensor(0.01)
    y1 = binary_gemm_a1(*cuda(x, qw, alpha, scale, shift), K, bias=cuda(bias)[0])
    ref1 = binary_linear_a1_reference(x, qw, alpha, bias, scale, shift, K)
    assert rel_err(y1, ref1) <= (1e-6 if xdt == F32 else TOL[xdt])


def test_leading_dims_and_empty_batch():
    K, N = 100, 33
    qw, alpha, bias = make(N, K, F32)
    x = torch.randn(2, 3, K, dtype=F16)
    y = binary_gemm(*cuda(x, qw, alpha), K, bias=cuda(bias)[0])
    assert y.shape == (2, 3, N) and rel_err(y, binary_linear_reference(x, qw, alpha, bias, K)) <= TOL[F16]
    s, t = torch.tensor(1.0), torch.tensor(0.0)
    y1 = binary_gemm_a1(*cuda(x, qw, alpha, s, t), K)
    assert y1.shape == (2, 3, N)
    assert rel_err(y1, binary_linear_a1_reference(x, qw, alpha, None, s, t, K)) <= TOL[F16]
    for lead in [(0,), (2, 0)]:
        x0 = torch.randn(*lead, K, device=CUDA)
        assert binary_gemm(x0, *cuda(qw, alpha), K).shape == (*lead, N)
        assert binary_gemm_a1(x0, *cuda(qw, alpha, s, t), K).shape == (*lead, N)


def test_non_contiguous_x_and_float64_bias():
    K, N = 200, 40
    qw, alpha, bias = make(N, K, torch.float64)
    x = torch.randn(K, 7).t()  # [7, K], not contiguous
    y = binary_gemm(*cuda(x, qw, alpha), K, bias=cuda(bias)[0])
    assert rel_err(y, binary_linear_reference(x, qw, alpha, bias, K)) <= TOL[F32]


def test_current_stream_and_no_host_sync():
    K, N = 1024, 300
    qw, alpha, bias = make(N, K, F32)
    x = torch.randn(3, K)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xs, qws, als, bs = cuda(x, qw, alpha, bias)
        s, t = cuda(torch.tensor(0.5), torch.tensor(0.1))
        y1 = binary_gemm(xs, qws, als, K, bias=bs)
        y2 = binary_gemm(torch.cat([xs] * 40), qws, als, K, bias=bs)
        y3 = binary_gemm_a1(xs, qws, als, s, t, K, bias=bs)
    stream.synchronize()
    ref = binary_linear_reference(x, qw, alpha, bias, K)
    assert rel_err(y1, ref) <= TOL[F32] and rel_err(y2[:3], ref) <= TOL[F32]
    ref3 = binary_linear_a1_reference(x, qw, alpha, bias, torch.tensor(0.5), torch.tensor(0.1), K)
    assert rel_err(y3, ref3) <= 1e-6


def test_opcheck():
    K, N = 100, 33
    qw, alpha, bias = cuda(*make(N, K, F16))
    s, t = cuda(torch.tensor(0.5), torch.tensor(-0.2))
    for x in (torch.randn(3, K, dtype=F16, device=CUDA), torch.randn(2, 70, K, device=CUDA)):
        for b in (None, bias):
            torch.library.opcheck(torch.ops.slimformer.binary_gemm.default, (x, qw, alpha, b, K))
            torch.library.opcheck(torch.ops.slimformer.binary_gemm_a1.default, (x, qw, alpha, b, s, t, K))


# -- bad input ----------------------------------------------------------------------------------

@pytest.fixture
def good():
    qw, alpha, bias = cuda(*make(40, 100, F32))
    return dict(x=torch.randn(3, 100, device=CUDA), qweight=qw, alpha=alpha, bias=bias,
                act_scale=torch.tensor(1.0, device=CUDA), act_shift=torch.tensor(0.0, device=CUDA), K=100)


def _call(a, a1):
    if a1:
        return torch.ops.slimformer.binary_gemm_a1(a["x"], a["qweight"], a["alpha"], a["bias"], a["act_scale"],
                                                   a["act_shift"], a["K"])
    return torch.ops.slimformer.binary_gemm(a["x"], a["qweight"], a["alpha"], a["bias"], a["K"])


BAD = {
    "K_zero": (lambda a: a.update(K=0), r"in_features must be positive"),
    "x_last_dim": (lambda a: a.update(x=torch.randn(3, 99, device=CUDA)), r"x's last dimension must be in_features=100"),
    "x_float64": (lambda a: a.update(x=a["x"].double()), r"x must be float32, float16 or bfloat16"),
    "qweight_float": (lambda a: a.update(qweight=a["qweight"].float()), r"qweight must be int32"),
    "qweight_shape": (lambda a: a.update(qweight=a["qweight"][:, :3]), r"qweight must have shape \(3, 4, 16\)"),
    "alpha_fp16": (lambda a: a.update(alpha=a["alpha"].half()), r"alpha must be a non-empty 1-D float32"),
    "alpha_length": (lambda a: a.update(alpha=a["alpha"][:32]), r"qweight must have shape \(2, 4, 16\)"),
    "bias_shape": (lambda a: a.update(bias=torch.randn(41, device=CUDA)), r"bias must have shape \(40\)"),
    "bias_int": (lambda a: a.update(bias=torch.ones(40, dtype=torch.int32, device=CUDA)), r"bias must be floating"),
    "x_on_cpu": (lambda a: a.update(x=a["x"].cpu()), r"x is on cpu|one device"),
    "qweight_on_cpu": (lambda a: a.update(qweight=a["qweight"].cpu()), r"is on cpu|one device"),
    "alpha_on_cpu": (lambda a: a.update(alpha=a["alpha"].cpu()), r"alpha is on cpu|one device"),
    "bias_on_cpu": (lambda a: a.update(bias=a["bias"].cpu()), r"bias is on cpu|one device"),
}
BAD_A1 = {
    "scale_on_cpu": (lambda a: a.update(act_scale=torch.tensor(1.0)), r"act_scale is on cpu|one device"),
    "shift_two": (lambda a: a.update(act_shift=torch.zeros(2, device=CUDA)), r"act_shift must be a float32 tensor with one"),
    "shift_fp16": (lambda a: a.update(act_shift=torch.tensor(0.0, dtype=F16, device=CUDA)), r"act_shift must be a float32"),
}


@pytest.mark.parametrize("a1", [False, True], ids=["w1afp", "w1a1"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(name, a1, good):
    mutate, message = BAD[name]
    mutate(good)
    with pytest.raises(OP_ERRORS, match=message):
        _call(good, a1)
    torch.cuda.synchronize()  # nothing was launched with bad arguments


@pytest.mark.parametrize("name", list(BAD_A1))
def test_bad_act_params_raise(name, good):
    mutate, message = BAD_A1[name]
    mutate(good)
    with pytest.raises(OP_ERRORS, match=message):
        _call(good, True)
    torch.cuda.synchronize()
