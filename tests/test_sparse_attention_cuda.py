"""torch.ops.slimformer.sparse_attention_fwd / _bwd on CUDA against the fp64 reference.

Paths of the CUDA adapter (csrc/attention/sparse_attention_cuda_op.cpp): the forward runs the
tensor-core kernel (mma.sync m16n8k16) for fp16/bf16 and the SIMT kernel for fp32; the backward runs
the SIMT delta, dQ (row CSR) and dK/dV (column CSR, GQA group summed in registers) kernels for every
dtype. All tests are marked ``cuda`` and skip without a GPU; the kernels' index, mask and softmax
math (and host replays of every kernel) are tested on the CPU in test_sparse_attention_cuda_math.py.
Tolerances: fp32 1e-5 relative; fp16/bf16 at most 2x the error of plain PyTorch attention in the
same dtype (reference.masked_attention), plus a small floor.
"""
from __future__ import annotations

import pytest
import torch

from slimformer import _C
from slimformer.attention.patterns import BigBird, BlockLayout, SlidingWindow
from slimformer.attention.reference import masked_attention, repeat_kv, sparse_attention_reference
from slimformer.ops.attention import sparse_attention, sparse_attention_with_lse

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _C.has_cuda_kernels, reason="slimformer was built without CUDA kernels"),
]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CUDA = "cuda"
ops = torch.ops.slimformer

PATTERNS = {
    "window": lambda: SlidingWindow(48),
    "window_global": lambda: SlidingWindow(20, global_tokens=(0, 7, 100)),
    "window_causal": lambda: SlidingWindow(64, causal=True),
    "bigbird64": lambda: BigBird(block_size=64, random_blocks=2, seed=1),
    "bigbird16_causal": lambda: BigBird(block_size=16, random_blocks=2, causal=True),
    "bigbird48": lambda: BigBird(block_size=48, random_blocks=1),
    "layout128": lambda: BlockLayout(128, (torch.rand(1, 9, 9) < 0.5) | torch.eye(9, dtype=torch.bool)[None]),
    "layout32_heads": lambda: BlockLayout(32, torch.rand(4, 33, 33) < 0.3),
}


def rel_err(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def make(name, B=1, Hq=2, Hkv=1, Sq=97, Sk=None, D=64, dtype=F32, causal=False, padding=False, strided=False):
    Sk = Sq if Sk is None else Sk
    pat = PATTERNS[name]()
    plan = pat.plan(Sq, Sk, causal=causal, num_heads=Hq)
    allowed = pat.dense_mask(Sq, Sk, causal=causal, num_heads=Hq)
    if strided:  # [B, S, H, D] storage seen as [B, H, S, D]; k / v rows of odd stride (no 16-byte loads)
        q = torch.randn(B, Sq, Hq, D).to(dtype).transpose(1, 2)
        k = torch.randn(B, Hkv, Sk, D + 1).to(dtype)[..., :D]
        v = torch.randn(B, Sk, Hkv, D + 3).to(dtype)[..., 1:D + 1].transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, h, s, D).to(dtype) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    key_mask = None
    if padding:
        key_mask = torch.ones(B, Sk, dtype=torch.bool)
        key_mask[0, Sk - Sk // 3:] = False
        if B > 1:
            key_mask[1, : Sk // 4] = False
    return plan, allowed, q, k, v, key_mask


def to_cuda(*ts):
    return [t.to(CUDA) if t is not None else None for t in ts]


def check_forward(plan, allowed, q, k, v, key_mask, scale=None):
    qc, kc, vc, kmc = to_cuda(q, k, v, key_mask)
    out, lse = sparse_attention_with_lse(qc, kc, vc, plan, key_mask=kmc, scale=scale)
    torch.cuda.synchronize()
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous() and lse.dtype == F32
    ref, ref_lse = sparse_attention_reference(q, k, v, allowed, key_mask, scale)
    out, lse = out.cpu(), lse.cpu()
    assert not torch.isnan(out).any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert (out.float()[empty] == 0).all()
    if q.dtype == F32:
        tol = 1e-5
    else:
        base = rel_err(masked_attention(q.float().to(q.dtype), k, v, allowed, key_mask, scale).nan_to_num(0), ref)
        tol = 2 * base + 1e-3
    assert rel_err(out, ref) <= tol
    assert torch.allclose(lse[~empty].double(), ref_lse[~empty], atol=2e-3 if q.dtype != F32 else 1e-4, rtol=1e-4)
    return out, lse


CASES = [
    ("window", dict()),
    ("window", dict(Sq=1025, Hq=4, Hkv=2)),
    ("window_global", dict(B=2, padding=True)),
    ("window_causal", dict(Sq=1025, causal=True, Hq=4, Hkv=1)),
    ("window_causal", dict(Sq=97, Sk=1025)),                  # chunked prefill at an offset
    ("bigbird64", dict(Sq=1025, Hq=3, Hkv=3)),
    ("bigbird16_causal", dict(B=2, padding=True, Hq=4, Hkv=2)),
    ("bigbird48", dict(Sq=300)),
    ("layout128", dict(Sq=97, Sk=1025, B=2, padding=True)),
    ("layout32_heads", dict(Sq=1025, Hq=4, Hkv=2, causal=True)),
    ("window", dict(strided=True, B=2, Hq=4, Hkv=2)),
    ("bigbird64", dict(strided=True, Sq=200)),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_forward_matches_fp64(name, kw, dtype):
    check_forward(*make(name, dtype=dtype, **kw))


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128])
def test_head_dims(D, dtype):
    check_forward(*make("bigbird16_causal", D=D, dtype=dtype, Sq=150, Hq=2, Hkv=1, padding=True, B=2))
    check_forward(*make("window_global", D=D, dtype=dtype, Sq=130))


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("name", ["window_causal", "bigbird64", "layout128"])
@pytest.mark.parametrize("Sk", [1, 97, 1025])
def test_decode_one_query(Sk, name, dtype):
    if name == "layout128" and Sk > 9 * 128:
        pytest.skip("layout covers 1152 keys")
    check_forward(*make(name, Sq=1, Sk=Sk, dtype=dtype, Hq=4, Hkv=1, causal=True))


def test_scale_and_empty_rows():
    plan, allowed, q, k, v, _ = make("window", B=2, Sq=97)
    km = torch.zeros(2, 97, dtype=torch.bool)
    km[1, 3:50] = True  # batch row 0 fully padded
    out, lse = check_forward(plan, allowed, q, k, v, km, scale=0.05)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()


def reference_grads(q, k, v, allowed, key_mask, scale, dout):
    """fp64 flash-attention gradients (dS = P (dP - rowsum(dO O))), GQA heads summed into their kv head."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = sparse_attention_reference(q, k, v, allowed, key_mask, scale)
    g = q.shape[1] // k.shape[1]
    q64, k64, v64, do = q.double(), repeat_kv(k.double(), g), repeat_kv(v.double(), g), dout.double()
    mask = allowed[None] if key_mask is None else allowed[None] & key_mask[:, None, None, :]
    s = (q64 @ k64.transpose(-1, -2)) * scale
    p = torch.where(mask, torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None]), 0.0)
    ds = p * (do @ v64.transpose(-1, -2) - (do * out).sum(-1, keepdim=True))
    fold = lambda t: t.reshape(t.shape[0], k.shape[1], g, *t.shape[2:]).sum(2)  # noqa: E731
    return ds @ k64 * scale, fold(ds.transpose(-1, -2) @ q64 * scale), fold(p.transpose(-1, -2) @ do)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_backward_matches_fp64(name, kw, dtype):
    plan, allowed, q, k, v, key_mask = make(name, dtype=dtype, **kw)
    qc, kc, vc, kmc = (t.requires_grad_() if t is not None and t.is_floating_point() else t
                       for t in to_cuda(q, k, v, key_mask))
    out = sparse_attention(qc, kc, vc, plan, key_mask=kmc)
    dout = torch.randn(out.shape, dtype=dtype)
    out.backward(dout.to(CUDA))
    torch.cuda.synchronize()
    want = reference_grads(q, k, v, allowed, key_mask, None, dout)
    tol = {F32: 1e-5, F16: 1e-2, BF16: 4e-2}[dtype]
    for name_, t, w in (("dq", qc, want[0]), ("dk", kc, want[1]), ("dv", vc, want[2])):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape
        assert not torch.isnan(t.grad).any(), name_
        assert rel_err(t.grad, w) <= tol, name_


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_matches_cpu_kernel(dtype):
    plan, _, q, k, v, key_mask = make("bigbird16_causal", B=2, Hq=4, Hkv=2, Sq=130, dtype=dtype, padding=True)
    cpu_out, cpu_lse = sparse_attention_with_lse(q, k, v, plan, key_mask=key_mask)
    out, lse = sparse_attention_with_lse(*to_cuda(q, k, v), plan, key_mask=key_mask.to(CUDA))
    assert rel_err(out, cpu_out) <= (1e-5 if dtype == F32 else 2e-2)
    finite = ~torch.isinf(cpu_lse)
    assert torch.equal(torch.isinf(lse.cpu()), ~finite)


def test_opcheck():
    plan, _, q, k, v, key_mask = make("window_global", B=2, Sq=70, D=32, padding=True)
    plan = plan.to(CUDA)
    args = (*to_cuda(q, k, v), plan.row_ptr, plan.col_idx, plan.col_full, plan.col_ptr, plan.row_idx, plan.row_full,
            plan.global_mask, key_mask.to(CUDA), plan.block_size, plan.q_offset, plan.first_q_block,
            plan.window_left, plan.window_right, plan.causal, 0.125)
    torch.library.opcheck(ops.sparse_attention_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# -- bad input (the CUDA adapter's own checks; the Python wrapper checks most of these first) --------------
def _args(**over):
    plan, _, q, k, v, km = make("window_global", B=2, Sq=70, D=64, padding=True)
    plan = plan.to(CUDA)
    a = dict(q=q.cuda(), k=k.cuda(), v=v.cuda(), row_ptr=plan.row_ptr, col_idx=plan.col_idx, col_full=plan.col_full,
             col_ptr=plan.col_ptr, row_idx=plan.row_idx, row_full=plan.row_full, global_mask=plan.global_mask,
             key_mask=km.cuda(), block_size=plan.block_size, q_offset=plan.q_offset,
             first_q_block=plan.first_q_block, window_left=plan.window_left, window_right=plan.window_right,
             causal=plan.causal, scale=0.125)
    a.update(over)
    return list(a.values())


def _bad(kind):
    q = torch.randn(2, 2, 70, 64, device=CUDA)
    kv = torch.randn(2, 1, 70, 64, device=CUDA)
    return {
        "head-dim": dict(q=torch.randn(2, 2, 70, 48, device=CUDA), k=torch.randn(2, 1, 70, 48, device=CUDA),
                         v=torch.randn(2, 1, 70, 48, device=CUDA)),
        "dtype": dict(q=q.double(), k=kv.double(), v=kv.double()),
        "mixed-dtype": dict(k=kv.half()),
        "device": dict(k=kv.cpu()),
        "ndim": dict(q=q[0]),
        "heads": dict(q=torch.randn(2, 3, 70, 64, device=CUDA), k=torch.randn(2, 2, 70, 64, device=CUDA),
                      v=torch.randn(2, 2, 70, 64, device=CUDA)),
        "last-dim-stride": dict(q=torch.randn(2, 2, 70, 128, device=CUDA)[..., ::2]),
        "block-size": dict(block_size=24),
        "q-offset": dict(q_offset=5),
        "row-ptr-dtype": dict(row_ptr=torch.zeros(1, 3, dtype=torch.int64, device=CUDA)),
        "row-ptr-shape": dict(row_ptr=torch.zeros(1, 7, dtype=torch.int32, device=CUDA)),
        "key-mask": dict(key_mask=torch.ones(2, 70, device=CUDA)),
        "global-mask": dict(global_mask=torch.ones(69, dtype=torch.uint8, device=CUDA)),
    }[kind]


BAD = {"head-dim": "head_dim", "dtype": "float32, float16 or bfloat16", "mixed-dtype": "share one dtype",
       "device": "is on", "ndim": "4-D", "heads": "multiple", "last-dim-stride": "contiguous",
       "block-size": "multiple of 16", "q-offset": "lie inside", "row-ptr-dtype": "row_ptr",
       "row-ptr-shape": "row_ptr", "key-mask": "key_mask", "global-mask": "global_mask"}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_inputs_raise(kind):
    with pytest.raises(ValueError, match=BAD[kind]):
        ops.sparse_attention_fwd(*_args(**_bad(kind)))


def test_corrupt_csr_never_reads_out_of_bounds():
    """Contents of the CSR arrays are not checked on CUDA (that would need a host sync): ranges are clamped
    to [0, nnz) and tile indices outside the grid skipped. The result is garbage, but no fault."""
    plan, _, q, k, v, km = make("window", Sq=130)
    plan = plan.to(CUDA)
    rp = plan.row_ptr.clone()
    rp[0, -1] = 10 ** 6
    ci = plan.col_idx.clone()
    ci[0] = 10 ** 6
    out, lse = ops.sparse_attention_fwd(*to_cuda(q, k, v), rp, ci, plan.col_full, plan.col_ptr, plan.row_idx,
                                        plan.row_full, None, None, plan.block_size, plan.q_offset, plan.first_q_block,
                                        plan.window_left, plan.window_right, plan.causal, 0.125)
    torch.cuda.synchronize()
    assert out.shape == q.shape
