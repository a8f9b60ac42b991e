"""Shared fixtures for the GPTQ CPU tests.

- ``seed`` (autouse): seeds torch from the test's node id, so every parametrized case draws fresh
  random data and a failure reproduces with the same data.
- ``isa``: switches the CPU kernel implementation (``slimformer._C.set_cpu_isa``) and restores the
  previous one afterwards. Parametrize it indirectly (``@pytest.mark.parametrize("isa", ["scalar",
  "avx2"], indirect=True)``) or call it (``isa("scalar")``); the SIMD levels skip on CPUs without them.
- ``make_gptq``: a factory for random GPTQ checkpoint tensors plus their fp64 ground truth, computed
  from the integer values directly (independent of slimformer's unpacking and reference code).

Nothing here touches markers or collection, so ``pytest -m cuda`` keeps working.
"""
from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import pytest
import torch

import slimformer
from slimformer import _C
from slimformer.gptq import pack_cols, pack_rows


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """A per-test seed (crc32 of the node id); torch's global generator is seeded with it."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


@pytest.fixture
def isa(request):
    """Force a CPU ISA for the test; yields a setter ``isa(name) -> active name``; restores afterwards."""
    before = _C.active_cpu_isa()

    def use(name: str) -> str:
        if name == "avx2" and not _C.cpu_supports_avx2():
            pytest.skip("this CPU lacks AVX2/FMA/F16C")
        if name == "avxvnni" and not _C.cpu_supports_avxvnni():
            pytest.skip("this CPU lacks AVX-VNNI")
        if name == "avx512vnni" and not _C.cpu_supports_avx512vnni():
            pytest.skip("this CPU lacks AVX-512 VNNI")
        _C.set_cpu_isa(name)
        active = _C.active_cpu_isa()
        if name != "auto":
            assert active == name
        return active

    name = getattr(request, "param", None)
    if name is not None:
        use(name)
    try:
        yield use
    finally:
        _C.set_cpu_isa(before)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in fp64."""
    y, ref = y.double(), ref.double()
    return float(torch.linalg.vector_norm(y - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def act_order_g_idx(K: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """g_idx as GPTQ with desc_act makes it: a random column order ``perm`` and g_idx[perm[i]] = i // gs."""
    perm = torch.randperm(K)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // group_size).to(torch.int32)
    return g_idx, perm


def _make_gptq(K: int, N: int, bits: int, group_size: int = 128, *, act_order: bool = False, sym: bool = False,
               zero_offset: int = 1, scale_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype | None = None,
               g_idx: torch.Tensor | None = None) -> SimpleNamespace:
    """Random checkpoint tensors (qweight, qzeros, scales, g_idx, bias) and the fp64 weight W [K, N].

    ``zstored`` is what qzeros holds; the kernels use zstored + zero_offset as the zero point.
    Symmetric grids store 2**(bits-1) - zero_offset (7 for v1 4-bit, as GPTQ does).
    """
    gs = K if group_size == -1 else group_size
    G = math.ceil(K / gs)
    if g_idx is not None:
        G = int(g_idx.max()) + 1
    elif act_order:
        g_idx, _ = act_order_g_idx(K, gs)
    else:
        g_idx = (torch.arange(K) // gs).to(torch.int32)
    maxq = (1 << bits) - 1
    q = torch.randint(0, maxq + 1, (K, N), dtype=torch.int64)
    if sym:
        zstored = torch.full((G, N), (1 << (bits - 1)) - zero_offset, dtype=torch.int64)
    else:
        zstored = torch.randint(0, maxq + 1, (G, N), dtype=torch.int64)
    scales = ((torch.rand(G, N) + 0.5) * (2.0 / (1 << bits))).to(scale_dtype)
    bias = torch.randn(N).to(bias_dtype) if bias_dtype is not None else None
    g = g_idx.long()
    W = scales.double()[g] * (q.double() - (zstored.double() + zero_offset)[g])
    return SimpleNamespace(
        K=K, N=N, G=G, bits=bits, group_size=group_size, zero_offset=zero_offset,
        qweight=pack_rows(q, bits), qzeros=pack_cols(zstored, bits), scales=scales,
        g_idx=g_idx.to(torch.int32).contiguous(), bias=bias, q=q, zstored=zstored, W=W,
    )


@pytest.fixture
def make_gptq():
    """Factory fixture: ``make_gptq(K, N, bits, group_size, act_order=, sym=, zero_offset=, ...)``."""
    return _make_gptq


def reference_gemm(x: torch.Tensor, d: SimpleNamespace, perm: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp64 y = x[..., perm] @ W (+ bias) from the ground-truth W of a ``make_gptq`` case."""
    x64 = x.double()
    if perm is not None:
        x64 = x64[..., perm.long()]
    y = x64 @ d.W
    return y + bias.double() if bias is not None else y


@pytest.fixture
def helpers():
    """rel_err, reference_gemm and act_order_g_idx for test modules (conftest is not importable)."""
    return SimpleNamespace(rel_err=rel_err, reference_gemm=reference_gemm, act_order_g_idx=act_order_g_idx)


def pytest_report_header(config):
    return (f"slimformer {slimformer.__version__}, torch {torch.__version__}, cpu isa {_C.active_cpu_isa()} "
            f"(avx2 supported: {_C.cpu_supports_avx2()}), threads {torch.get_num_threads()}")
