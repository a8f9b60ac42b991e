"""The CUDA sparse attention kernels' index, mask and softmax math, and host replays of the kernels, on the CPU.

csrc/attention/sparse_attention_cuda_math.h holds everything the kernels compute except launches,
barriers, shuffles, smem staging, the mma instruction and the hardware fp16/bf16 conversions;
slimformer._C._test_sparse_cuda_* exposes the same functions (compiled into every build, CPU-only
too). Small functions are checked against the PTX ISA's fragment tables and plain Python;
``_test_sparse_cuda_emulate_fwd`` / ``_bwd`` run every CTA, warp and lane of the real launch grid through
the same code (mma.sync emulated through the fragment maps), checked against the fp64 reference.
"""
from __future__ import annotations

import math

import pytest
import torch

from slimformer import _C
from slimformer.attention.patterns import BigBird, BlockLayout, SlidingWindow
from slimformer.attention.reference import repeat_kv, sparse_attention_reference

CONST = _C._test_sparse_cuda_constants()
LOG2E = 1.0 / math.log(2.0)


# ---- fragment maps: the PTX ISA tables for mma.m16n8k16 (f16 / bf16 A and B, f32 C), written out
# independently of the header ----
def _ptx_a(lane, e):
    g, t = lane // 4, lane % 4
    row = g + 8 if e in (2, 3, 6, 7) else g
    col = t * 2 + (e & 1) + (8 if e >= 4 else 0)
    return row, col


def _ptx_b(lane, e):
    g, t = lane // 4, lane % 4
    return t * 2 + (e & 1) + (8 if e >= 2 else 0), g


def _ptx_c(lane, e):
    g, t = lane // 4, lane % 4
    return g + (8 if e >= 2 else 0), t * 2 + (e & 1)


def test_fragment_maps_match_ptx_tables():
    a, b, c = _C._test_sparse_cuda_frag_maps()
    for lane in range(32):
        for e in range(8):
            assert tuple(a[lane, e]) == _ptx_a(lane, e)
        for e in range(4):
            assert tuple(b[lane, e]) == _ptx_b(lane, e)
            assert tuple(c[lane, e]) == _ptx_c(lane, e)
    # every element of A (16x16), B (16x8), C (16x8) held by exactly one (lane, element)
    assert len({tuple(x) for x in a.reshape(-1, 2)}) == 256
    assert len({tuple(x) for x in b.reshape(-1, 2)}) == 128
    assert len({tuple(x) for x in c.reshape(-1, 2)}) == 128
    # the kernel loads register pairs (e, e+1) as one 32-bit word: adjacent columns / k
    for lane in range(32):
        for e in (0, 2, 4, 6):
            assert a[lane, e + 1, 1] == a[lane, e, 1] + 1 and a[lane, e + 1, 0] == a[lane, e, 0]
        for e in (0, 2):
            assert b[lane, e + 1, 0] == b[lane, e, 0] + 1 and b[lane, e + 1, 1] == b[lane, e, 1]
            assert c[lane, e + 1, 1] == c[lane, e, 1] + 1


def test_p_fragments_become_a_fragments():
    """S's C fragments of n-tiles 2j, 2j+1 reused in registers as P's A fragment of k-block j."""
    a, _, c = _C._test_sparse_cuda_frag_maps()
    for lane in range(32):
        for e in range(8):
            tile, ce = _C._test_sparse_cuda_p_to_a(e)
            assert tile in (0, 1)
            row, col = c[lane, ce]
            assert (row, tile * 8 + col) == tuple(a[lane, e])


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
def test_smem_rows_aligned_and_spread(d):
    pad = CONST["smem_pad"]
    assert _C._test_sparse_cuda_kv_smem_index(1, 0, d) == d + pad
    assert ((d + pad) * 2) % 16 == 0  # uint4 stores of every staged row
    # 32-bit B-fragment loads of S (8 rows n, 4 column pairs): distinct banks per n-row group
    _, b, _ = _C._test_sparse_cuda_frag_maps()
    banks = {}
    for lane in range(32):
        word = _C._test_sparse_cuda_kv_smem_index(int(b[lane, 0, 1]), int(b[lane, 0, 0]), d) // 2
        banks.setdefault(word % 32, set()).add(word)
    assert max(len(w) for w in banks.values()) == 1  # conflict-free


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
def test_simt_map_covers_rows_and_dims(d):
    seen = set()
    for t in range(CONST["simt_rows"] * CONST["simt_lanes"]):
        for i in range(d // CONST["simt_lanes"]):
            seen.add(_C._test_sparse_cuda_simt_map(t, i))
    assert seen == {(r, x) for r in range(CONST["simt_rows"]) for x in range(d)}


def test_supported_head_dims():
    assert [d for d in range(1, 257) if _C._test_sparse_cuda_supported_head_dim(d)] == [32, 64, 80, 96, 128]


@pytest.mark.parametrize("bs", [16, 32, 48, 64, 80, 96, 112, 128, 144, 192, 256])
def test_mma_warps_divide_block(bs):
    w = _C._test_sparse_cuda_mma_warps(bs)
    assert 1 <= w <= CONST["max_warps"] and bs % (16 * w) == 0
    if bs % 64 == 0:
        assert w == 4


@pytest.mark.parametrize("bs,rows", [(64, 64), (64, 16), (16, 16), (48, 48), (128, 64), (96, 32)])
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 300), (97, 97), (5, 130), (200, 1025)])
def test_cta_rows_cover_queries_once(bs, rows, q_len, kv_len):
    q_offset = kv_len - q_len
    first = q_offset // bs
    nqb = (q_offset + q_len - 1) // bs - first + 1
    count = None
    covered = []
    x = 0
    while True:
        plan_row, start, lo, hi, count = _C._test_sparse_cuda_cta_rows(x, rows, bs, q_offset, q_len, first, nqb)
        if x >= count:
            break
        assert start % rows == 0 and q_offset <= lo and hi <= q_offset + q_len
        for pos in range(lo, hi):
            assert start <= pos < start + rows
            assert pos // bs - first == plan_row  # never straddles two CSR rows
            covered.append(pos)
        x += 1
    assert sorted(covered) == list(range(q_offset, q_offset + q_len))


def test_round_to_matches_torch():
    x = torch.cat([torch.randn(4000) * 10 ** torch.randint(-9, 4, (4000,)).float(), torch.tensor([0.0, 1.0, -2.5])])
    for mode, dt in ((1, torch.float16), (2, torch.bfloat16)):
        want = x.to(dt).float()
        got = torch.tensor([_C._test_sparse_cuda_round(float(v), mode) for v in x])
        assert torch.equal(got, want), (mode, (got != want).nonzero()[:5])


# ---- online softmax ----
@pytest.mark.parametrize("pattern", ["plain", "masked_first", "all_masked", "single", "huge"])
def test_online_softmax_matches_softmax(pattern):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(70, generator=g) * 4
    if pattern == "masked_first":
        s[:32] = -math.inf
    elif pattern == "all_masked":
        s[:] = -math.inf
    elif pattern == "single":
        s[:] = -math.inf
        s[45] = 3.0
    elif pattern == "huge":
        s = s * 50
    if pattern in ("plain", "masked_first", "huge"):
        s[torch.rand(70, generator=g) < 0.2] = -math.inf
    chunks = [s[i:i + 32].tolist() for i in range(0, 70, 32)]
    w, lse, m, l = _C._test_sparse_cuda_online_softmax(chunks)
    s64 = s.double() / LOG2E  # log2-domain scores -> natural
    ref_lse = torch.logsumexp(s64, 0)
    if torch.isinf(ref_lse):
        assert lse == -math.inf and all(x == 0 for x in w) and l == 0
        return
    ref = torch.softmax(s64, 0)
    assert torch.allclose(torch.tensor(w, dtype=torch.float64), ref, atol=1e-6)
    assert abs(lse - float(ref_lse)) <= 1e-5 * max(1.0, abs(float(ref_lse)))


def test_bwd_prob_guards_empty_rows():
    assert _C._test_sparse_cuda_bwd_prob(-math.inf, -math.inf) == 0.0
    assert _C._test_sparse_cuda_bwd_prob(0.0, -math.inf) == 0.0
    assert abs(_C._test_sparse_cuda_bwd_prob(2.0 * LOG2E, 2.0) - 1.0) < 1e-6


# ---- problems ----
PATTERNS = {
    "window": lambda: SlidingWindow(40),
    "window_global": lambda: SlidingWindow(17, global_tokens=(0, 5, 70)),
    "window_causal": lambda: SlidingWindow(33, causal=True),
    "bigbird32": lambda: BigBird(block_size=32, random_blocks=2, seed=3),
    "bigbird16_causal": lambda: BigBird(block_size=16, window_blocks=3, random_blocks=1, causal=True),
    "bigbird48": lambda: BigBird(block_size=48, random_blocks=1),
    "layout128": lambda: BlockLayout(128, torch.tensor([[[1, 0, 1, 1, 0, 1, 0, 1, 1]] * 9]).bool()),
}


def _plan_args(plan, key_mask):
    g = None if plan.global_mask is None else plan.global_mask.numpy()
    km = None if key_mask is None else key_mask.to(torch.uint8).numpy()
    return dict(row_ptr=plan.row_ptr.numpy(), col_idx=plan.col_idx.numpy(), col_full=plan.col_full.numpy(),
                col_ptr=plan.col_ptr.numpy(), row_idx=plan.row_idx.numpy(), row_full=plan.row_full.numpy(),
                global_mask=g, key_mask=km, block_size=plan.block_size, q_offset=plan.q_offset,
                first_q_block=plan.first_q_block, window_left=plan.window_left, window_right=plan.window_right,
                causal=plan.causal)


def _problem(name, b=1, hq=2, hkv=1, sq=97, sk=None, d=32, causal=False, padding=False, dtype=torch.float32):
    sk = sq if sk is None else sk
    pat = PATTERNS[name]()
    plan = pat.plan(sq, sk, causal=causal, num_heads=hq)
    allowed = pat.dense_mask(sq, sk, causal=causal, num_heads=hq)
    q = torch.randn(b, hq, sq, d).to(dtype).float()
    k = torch.randn(b, hkv, sk, d).to(dtype).float()
    v = torch.randn(b, hkv, sk, d).to(dtype).float()
    key_mask = None
    if padding:
        key_mask = torch.ones(b, sk, dtype=torch.bool)
        key_mask[0, sk - sk // 3:] = False  # right padding in batch row 0
        if b > 1:
            key_mask[1, : sk // 4] = False  # left padding in row 1 (rows with nothing allowed appear)
    return plan, allowed, q, k, v, key_mask


CASES = [  # (pattern, kwargs)
    ("window", dict()),
    ("window", dict(sq=1, sk=130)),                       # decode: one query at the end
    ("window_global", dict(b=2, padding=True, d=64)),
    ("window_causal", dict(sq=40, sk=130, hq=4, hkv=2)),  # q_offset = 90, GQA
    ("bigbird32", dict(hq=3, hkv=3, d=80)),               # per-head layouts
    ("bigbird16_causal", dict(b=2, padding=True, d=96)),
    ("bigbird48", dict(sq=1025 // 8, d=128)),
    ("layout128", dict(sq=97, sk=1025, hq=4, hkv=1, padding=True, b=2)),  # MQA, 3 key chunks per tile
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_visited_mask_equals_pattern(name, kw):
    kw = {k: v for k, v in kw.items() if k in ("sq", "sk", "hq", "causal")}
    plan, allowed, q, k, _, _ = _problem(name, **kw, d=32)
    args = _plan_args(plan, None)
    for rows, chunk in ((16, CONST["simt_chunk"]), (16 * _C._test_sparse_cuda_mma_warps(plan.block_size),
                                                     CONST["key_chunk"])):
        got, skipped = _C._test_sparse_cuda_visited_mask(q.numpy(), k.numpy(), **args, scale=1.0, rows=rows,
                                                        chunk=chunk)
        got = torch.from_numpy(got)
        assert torch.equal(got, allowed.expand_as(got)), (rows, chunk)
        assert skipped >= 0


def _rel(x, ref):
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["fp32-simt", "fp16-mma", "bf16-mma"])
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_emulated_forward_matches_reference(name, kw, mode):
    dtype = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}[mode]
    plan, allowed, q, k, v, key_mask = _problem(name, **kw, dtype=dtype)
    scale = q.shape[-1] ** -0.5
    out, lse = _C._test_sparse_cuda_emulate_fwd(q.numpy(), k.numpy(), v.numpy(), **_plan_args(plan, key_mask),
                                                scale=scale, mode=mode)
    out, lse = torch.from_numpy(out), torch.from_numpy(lse)
    ref_out, ref_lse = sparse_attention_reference(q, k, v, allowed, key_mask, scale)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert (out[empty.expand_as(out[..., 0])] == 0).all()
    tol = {0: 2e-6, 1: 2e-3, 2: 1.5e-2}[mode]
    assert _rel(out, ref_out) <= tol
    assert torch.allclose(lse[~empty].double(), ref_lse[~empty], atol=1e-4, rtol=1e-5)


def _reference_grads(q, k, v, allowed, key_mask, scale, dout):
    """fp64 flash-attention gradients: dS = P * (dP - rowsum(dO * O)); GQA heads summed into their kv head."""
    out, lse = sparse_attention_reference(q, k, v, allowed, key_mask, scale)
    g = q.shape[1] // k.shape[1]
    q64, k64, v64, do = q.double(), repeat_kv(k.double(), g), repeat_kv(v.double(), g), dout.double()
    mask = allowed[None] if key_mask is None else allowed[None] & key_mask[:, None, None, :]
    s = (q64 @ k64.transpose(-1, -2)) * scale
    p = torch.where(mask, torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None]), 0.0)
    dv = p.transpose(-1, -2) @ do
    dp = do @ v64.transpose(-1, -2)
    ds = p * (dp - (do * out).sum(-1, keepdim=True))
    dq = ds @ k64 * scale
    dk = ds.transpose(-1, -2) @ q64 * scale
    fold = lambda t: t.reshape(t.shape[0], k.shape[1], g, *t.shape[2:]).sum(2)  # noqa: E731
    return out, lse, dq, fold(dk), fold(dv)


def test_reference_grads_match_autograd():
    plan, allowed, q, k, v, _ = _problem("window_causal", sq=40, sk=130, hq=4, hkv=2)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape, dtype=torch.float64)
    out, _ = sparse_attention_reference(q, k, v, allowed, None, 0.3)
    out.backward(dout)
    _, _, dq, dk, dv = _reference_grads(q.detach(), k.detach(), v.detach(), allowed, None, 0.3, dout)
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_emulated_backward_matches_reference(name, kw, mode):
    dtype = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}[mode]
    plan, allowed, q, k, v, key_mask = _problem(name, **kw, dtype=dtype)
    scale = q.shape[-1] ** -0.5
    dout = torch.randn(q.shape).to(dtype).float()
    out, lse, dq_r, dk_r, dv_r = _reference_grads(q, k, v, allowed, key_mask, scale, dout)
    out_t = out.to(dtype).float()  # what the forward hands the backward
    dq, dk, dv = _C._test_sparse_cuda_emulate_bwd(dout.numpy(), q.numpy(), k.numpy(), v.numpy(), out_t.numpy(),
                                                  lse.float().numpy(), **_plan_args(plan, key_mask), scale=scale,
                                                  mode=mode)
    tol = {0: 1e-5, 1: 5e-3, 2: 3e-2}[mode]
    for got, want in ((dq, dq_r), (dk, dk_r), (dv, dv_r)):
        got = torch.from_numpy(got)
        assert not torch.isnan(got).any()
        assert _rel(got, want) <= tol
