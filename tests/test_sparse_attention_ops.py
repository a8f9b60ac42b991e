"""CPU kernels of the sparse flash attention ops (slimformer.ops.sparse_attention) against the fp64
reference: every pattern, awkward lengths, decoding, GQA / MQA, padding, every dtype (error at most
2x that of plain PyTorch attention in the same dtype), head dims, strided inputs, gradients, ISA
parity, opcheck, torch.compile and input errors."""
from __future__ import annotations

import pytest
import torch

import slimformer
from slimformer import _C
from slimformer.attention.patterns import BigBird, BlockLayout, SlidingWindow
from slimformer.attention.reference import masked_attention, sparse_attention_reference
from slimformer.ops.attention import sparse_attention, sparse_attention_with_lse

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Error floor (relative) on top of 2x plain PyTorch's error: fp32 accumulation orders differ by ~1e-7.
FLOOR = {F32: 2e-6, F16: 1e-3, BF16: 4e-3}
ISAS = ["scalar", "avx2", "avx512vnni"]


def rel_err(y, ref):
    y, ref = y.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(y - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def _layout(heads, blocks, density=0.5, empty_row=None):
    lay = torch.rand(heads, blocks, blocks) < density
    lay |= torch.eye(blocks, dtype=torch.bool)[None]
    if empty_row is not None:
        lay[:, empty_row] = False
    return lay


# (pattern factory, q_len, causal, H, Hkv, D): the factory runs under the test's seed.
CASES = {
    "window-bidir-97": (lambda: SlidingWindow(37), 97, False, 4, 2, 64),
    "window-causal-1025": (lambda: SlidingWindow(100), 1025, True, 2, 1, 32),
    "window-globals-130": (lambda: SlidingWindow(20, global_tokens=(0, 5, 64, 129)), 130, False, 3, 3, 80),
    "window-globals-causal-130": (lambda: SlidingWindow(20, global_tokens=(0, 70)), 130, True, 2, 2, 96),
    "window-len1": (lambda: SlidingWindow(4), 1, False, 2, 1, 16),
    "window-len17": (lambda: SlidingWindow(3, causal=True), 17, False, 2, 2, 40),
    "bigbird-heads-200": (lambda: BigBird(16, random_blocks=2), 200, False, 4, 2, 40),
    "bigbird-causal-257": (lambda: BigBird(32), 257, True, 2, 1, 128),
    "bigbird-bs128-300": (lambda: BigBird(128, random_blocks=1), 300, False, 2, 2, 64),
    "layout-1head-97": (lambda: BlockLayout(16, _layout(1, 7, empty_row=3)), 97, False, 3, 1, 16),
    "layout-heads-causal-130": (lambda: BlockLayout(32, _layout(3, 5)), 130, True, 3, 3, 64),
}


def _inputs(B, H, Hkv, Sq, Sk, D, dtype=F32):
    q = torch.randn(B, H, Sq, D).to(dtype)
    k = torch.randn(B, Hkv, Sk, D).to(dtype)
    v = torch.randn(B, Hkv, Sk, D).to(dtype)
    return q, k, v


def _check_forward(q, k, v, plan, allowed, key_mask=None, scale=None):
    out, lse = sparse_attention_with_lse(q, k, v, plan, key_mask=key_mask, scale=scale)
    ref, ref_lse = sparse_attention_reference(q, k, v, allowed, key_mask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    base = rel_err(masked_attention(q, k, v, allowed, key_mask, scale), ref)
    err = rel_err(out, ref)
    assert err <= 2 * base + FLOOR[q.dtype], (err, base)
    # lse: -inf exactly where no key is allowed, else close (natural log).
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    tol = 1e-5 if q.dtype == F32 else 1e-4
    assert torch.allclose(lse[fin].double(), ref_lse[fin], atol=tol * (1 + ref_lse[fin].abs().max().item()))
    return out, ref


@pytest.mark.parametrize("case", list(CASES))
def test_forward_patterns(case):
    make, n, causal, H, Hkv, D = CASES[case]
    pattern = make()
    plan = pattern.plan(n, causal=causal, num_heads=H)
    allowed = pattern.dense_mask(n, causal=causal, num_heads=H)
    q, k, v = _inputs(2, H, Hkv, n, n, D)
    key_mask = torch.rand(2, n) > 0.15
    _check_forward(q, k, v, plan, allowed)
    _check_forward(q, k, v, plan, allowed, key_mask, scale=0.3)


@pytest.mark.parametrize("Sq", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("pattern", [SlidingWindow(64), BigBird(32, random_blocks=2), SlidingWindow(16, global_tokens=(0, 1))],
                         ids=["window", "bigbird", "window-globals"])
@pytest.mark.parametrize("Hkv", [1, 2], ids=["mqa", "gqa"])
def test_decode(Sq, pattern, Hkv):
    Sk, H = 301, 6
    plan = pattern.plan(Sq, Sk, causal=True, num_heads=H)
    assert plan.q_offset == Sk - Sq
    allowed = pattern.dense_mask(Sq, Sk, causal=True, num_heads=H)
    q, k, v = _inputs(2, H, Hkv, Sq, Sk, 64)
    _check_forward(q, k, v, plan, allowed)
    _check_forward(q, k, v, plan, allowed, torch.rand(2, Sk) > 0.3)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("D", [16, 32, 64, 80, 96, 128])
def test_dtypes_and_head_dims(dtype, D):
    pattern = SlidingWindow(24, global_tokens=(3,))
    n = 150
    plan = pattern.plan(n, causal=True)
    allowed = pattern.dense_mask(n, causal=True)
    q, k, v = _inputs(1, 4, 2, n, n, D, dtype)
    _check_forward(q, k, v, plan, allowed, torch.rand(1, n) > 0.2)


def test_fully_padded_row_gives_zeros():
    pattern = SlidingWindow(8)
    n = 70
    plan, allowed = pattern.plan(n), pattern.dense_mask(n)
    q, k, v = _inputs(3, 2, 2, n, n, 32)
    key_mask = torch.ones(3, n, dtype=torch.bool)
    key_mask[1] = False            # whole batch row padded: every query sees nothing
    key_mask[2, 20:50] = False     # a gap wider than the window: queries 28..41 see nothing
    out, _ = _check_forward(q, k, v, plan, allowed, key_mask)
    _, lse = sparse_attention_with_lse(q, k, v, plan, key_mask=key_mask)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
    assert torch.all(out[2, :, 28:42] == 0) and torch.all(torch.isneginf(lse[2, :, 28:42]))


def test_strided_inputs():
    """q, k, v as HF hands them over: [B, S, H, D] transposed to [B, H, S, D] (last dim contiguous)."""
    pattern = BigBird(16, random_blocks=1)
    n, H, Hkv = 99, 4, 2
    plan, allowed = pattern.plan(n, num_heads=H), pattern.dense_mask(n, num_heads=H)
    for dtype in (F32, BF16):
        q = torch.randn(2, n, H, 48).to(dtype).transpose(1, 2)
        kv = torch.randn(2, n, 2 * Hkv, 48).to(dtype)
        k, v = kv[:, :, :Hkv].transpose(1, 2), kv[:, :, Hkv:].transpose(1, 2)
        assert not q.is_contiguous() and not k.is_contiguous()
        out, _ = _check_forward(q, k, v, plan, allowed)
        torch.testing.assert_close(out, sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), plan))


# -- gradients ----------------------------------------------------------------------------------------
GRAD_CASES = {
    "window-globals-causal-gqa": (lambda: SlidingWindow(20, global_tokens=(0, 40)), 130, 130, True, 4, 2, 48),
    "bigbird-heads-mqa": (lambda: BigBird(16, random_blocks=2), 97, 97, False, 3, 1, 64),
    "layout-empty-row": (lambda: BlockLayout(16, _layout(2, 5, empty_row=2)), 80, 80, False, 2, 2, 32),
    "window-decode": (lambda: SlidingWindow(30), 3, 77, True, 2, 1, 80),
    "bigbird-bs128": (lambda: BigBird(128, random_blocks=1), 260, 260, True, 2, 2, 16),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients(case):
    make, Sq, Sk, causal, H, Hkv, D = GRAD_CASES[case]
    pattern = make()
    plan = pattern.plan(Sq, Sk, causal=causal, num_heads=H)
    allowed = pattern.dense_mask(Sq, Sk, causal=causal, num_heads=H)
    q, k, v = _inputs(2, H, Hkv, Sq, Sk, D)
    key_mask = torch.rand(2, Sk) > 0.2
    key_mask[1, : Sk // 2] = False  # some rows of batch 1 may see nothing at all
    dout = torch.randn(2, H, Sq, D)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = sparse_attention_reference(*ref_in, allowed, key_mask, 0.2)
    ref.backward(dout.double())
    ours_in = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sparse_attention(*ours_in, plan, key_mask=key_mask, scale=0.2)
    out.backward(dout)
    for name, a, b in zip("qkv", ours_in, ref_in):
        assert a.grad.dtype == F32 and a.grad.shape == b.shape
        assert rel_err(a.grad, b.grad) < 1e-5, (name, rel_err(a.grad, b.grad))


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_gradients_half(dtype):
    pattern = SlidingWindow(16, global_tokens=(1,))
    n, H, Hkv = 90, 4, 2
    plan, allowed = pattern.plan(n, causal=True), pattern.dense_mask(n, causal=True)
    q, k, v = _inputs(1, H, Hkv, n, n, 64, dtype)
    dout = torch.randn(1, H, n, 64).to(dtype)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    sparse_attention_reference(*ref_in, allowed)[0].backward(dout.double())
    base_in = [t.clone().requires_grad_() for t in (q, k, v)]
    masked_attention(*base_in, allowed).backward(dout)
    ours_in = [t.clone().requires_grad_() for t in (q, k, v)]
    sparse_attention(*ours_in, plan).backward(dout)
    for a, base, ref in zip(ours_in, base_in, ref_in):
        assert a.grad.dtype == dtype
        assert rel_err(a.grad, ref.grad) <= 2 * rel_err(base.grad, ref.grad) + FLOOR[dtype]


# -- ISA parity -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_isa_parity(isa, dtype):
    pattern = SlidingWindow(40, global_tokens=(2, 100))
    n, H, Hkv, D = 203, 4, 2, 80
    plan = pattern.plan(n, causal=True)
    q, k, v = _inputs(2, H, Hkv, n, n, D, dtype)
    key_mask = torch.rand(2, n) > 0.1
    dout = torch.randn(2, H, n, D).to(dtype)
    results = {}
    for name in ISAS:
        if name == "avx2" and not _C.cpu_supports_avx2() or name == "avx512vnni" and not _C.cpu_supports_avx512vnni():
            continue
        isa(name)
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = sparse_attention_with_lse(*ins, plan, key_mask=key_mask)
        out.backward(dout)
        results[name] = [out, lse] + [t.grad for t in ins]
    ref = results.pop("scalar")
    tol = 2e-6 if dtype == F32 else 1e-2  # half outputs: one rounding step apart at most
    for name, res in results.items():
        for a, b in zip(res, ref):
            fin = torch.isfinite(b)
            assert torch.equal(fin, torch.isfinite(a)), name
            assert rel_err(a[fin], b[fin]) < tol, (name, rel_err(a[fin], b[fin]))


# -- dispatcher integration -----------------------------------------------------------------------------
def _op_args(dtype=F32, key_mask=True, global_tokens=(0,)):
    pattern = SlidingWindow(16, global_tokens=global_tokens)
    n = 70
    plan = pattern.plan(n, causal=True)
    q, k, v = _inputs(2, 4, 2, n, n, 32, dtype)
    km = torch.rand(2, n) > 0.2 if key_mask else None
    csr = (plan.row_ptr, plan.col_idx, plan.col_full, plan.col_ptr, plan.row_idx, plan.row_full)
    scalars = (plan.block_size, plan.q_offset, plan.first_q_block, plan.window_left, plan.window_right, plan.causal,
               32 ** -0.5)
    return q, k, v, csr, plan.global_mask, km, scalars


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_opcheck_fwd(dtype):
    q, k, v, csr, g, km, sc = _op_args(dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.slimformer.sparse_attention_fwd.default, (q, k, v, *csr, g, km, *sc))


def test_opcheck_bwd():
    q, k, v, csr, g, km, sc = _op_args(key_mask=False, global_tokens=())
    out, lse = torch.ops.slimformer.sparse_attention_fwd(q, k, v, *csr, g, km, *sc)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.slimformer.sparse_attention_bwd.default,
                          (dout, q, k, v, out, lse, *csr, g, km, *sc))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    pattern = SlidingWindow(16)
    n = 70
    plan = pattern.plan(n)
    q, k, v = _inputs(1, 4, 2, n, n, 32)
    proj = torch.nn.Linear(32, 32)

    def f(x, k, v):
        return slimformer.ops.sparse_attention(proj(x), k, v, plan).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    if backend == "inductor":  # the backward graph is the same op either way; aot_eager checks it
        return
    qg = q.clone().requires_grad_()
    compiled(qg, k, v).sum().backward()
    qe = q.clone().requires_grad_()
    f(qe, k, v).sum().backward()
    torch.testing.assert_close(qg.grad, qe.grad)


# -- bad input ----------------------------------------------------------------------------------------------
def _call(q, k, v, csr, g, km, sc):
    return torch.ops.slimformer.sparse_attention_fwd(q, k, v, *csr, g, km, *sc)


def _bad(kind):
    q, k, v, csr, g, km, sc = _op_args()
    csr, sc = list(csr), list(sc)
    if kind == "dtype":
        q = q.double()
    elif kind == "mixed-dtype":
        k = k.half()
    elif kind == "ndim":
        q = q[0]
    elif kind == "heads":
        k, v = k[:, :1].expand(2, 3, *k.shape[2:]), v[:, :1].expand(2, 3, *v.shape[2:])
    elif kind == "head-dim":
        q, k, v = (torch.randn(*t.shape[:3], 300) for t in (q, k, v))
    elif kind == "last-dim-stride":
        q = torch.randn(*q.shape[:3], 64)[..., ::2]
    elif kind == "kv-shape":
        v = v[:, :, :-1]
    elif kind == "block-size":
        sc[0] = 24
    elif kind == "q-offset":
        sc[1] = 5
    elif kind == "first-q-block":
        sc[2] = 1
    elif kind == "row-ptr-dtype":
        csr[0] = csr[0].long()
    elif kind == "row-ptr-shape":
        csr[0] = csr[0][:, :-1]
    elif kind == "layout-heads":
        csr[0] = csr[0].expand(3, -1)
    elif kind == "col-idx-range":
        csr[1] = csr[1].clone()
        csr[1][-1] = 99
    elif kind == "row-ptr-range":
        csr[0] = csr[0].clone()
        csr[0][0, -1] = csr[1].numel() + 5
    elif kind == "row-ptr-order":
        csr[0] = csr[0].clone()
        csr[0][0, 1] = -1
    elif kind == "col-full-length":
        csr[2] = csr[2][:-1]
    elif kind == "key-mask":
        km = km.float()
    elif kind == "key-mask-shape":
        km = km[:, :-1]
    elif kind == "global-mask":
        g = g[:-1]
    return q, k, v, csr, g, km, sc


BAD = {
    "dtype": "float32, float16 or bfloat16", "mixed-dtype": "share one dtype", "ndim": "4-D", "heads": "multiple",
    "head-dim": "head_dim", "last-dim-stride": "contiguous", "kv-shape": "one shape", "block-size": "multiple of 16",
    "q-offset": "lie inside", "first-q-block": "first_q_block", "row-ptr-dtype": "row_ptr", "row-ptr-shape": "row_ptr",
    "layout-heads": "row_ptr", "col-idx-range": "col_idx", "row-ptr-range": "row_ptr", "row-ptr-order": "row_ptr",
    "col-full-length": "col_full", "key-mask": "key_mask", "key-mask-shape": "key_mask", "global-mask": "global_mask",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_inputs_raise(kind):
    with pytest.raises(ValueError, match=BAD[kind]):
        _call(*_bad(kind))


def test_bad_column_csr_raises_in_backward():
    q, k, v, csr, g, km, sc = _op_args()
    out, lse = _call(q, k, v, csr, g, km, sc)
    bad = list(csr)
    bad[4] = bad[4].clone()
    bad[4][0] = 1000
    with pytest.raises(ValueError, match="row_idx"):
        torch.ops.slimformer.sparse_attention_bwd(torch.randn_like(out), q, k, v, out, lse, *bad, g, km, *sc)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_decode_half_in_kernel_conversion(isa, dtype):
    """Decoding visits each key tile about once, so fp16 / bf16 rows are converted inside the kernels
    (not staged as fp32 by the adapter); D = 80 also needs the padded row copies. Every ISA."""
    pattern = SlidingWindow(40, global_tokens=(0,))
    Sq, Sk, H, Hkv, D = 3, 400, 4, 2, 80
    plan = pattern.plan(Sq, Sk, causal=True)
    allowed = pattern.dense_mask(Sq, Sk, causal=True)
    q, k, v = _inputs(2, H, Hkv, Sq, Sk, D, dtype)
    dout = torch.randn(2, H, Sq, D).to(dtype)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = sparse_attention_reference(*ref_in, allowed)[0]
    ref.backward(dout.double())
    base = rel_err(masked_attention(q, k, v, allowed), ref)
    for name in ISAS:
        if name == "avx2" and not _C.cpu_supports_avx2() or name == "avx512vnni" and not _C.cpu_supports_avx512vnni():
            continue
        isa(name)
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = sparse_attention(*ins, plan)
        assert rel_err(out, ref) <= 2 * base + FLOOR[dtype], name
        out.backward(dout)
        for a, r in zip(ins, ref_in):
            assert rel_err(a.grad, r.grad) < 2 * FLOOR[dtype] + 4e-3, name


def test_backward_fused_and_two_pass_agree():
    """The adapter fuses dQ into the dK / dV items when B * Hkv >= 2 * threads, else runs two passes:
    B * Hkv = 2 takes the fused path on 1 thread and the two-pass one on 2 threads."""
    pattern = BigBird(16, random_blocks=2)
    n, H = 120, 3
    plan, allowed = pattern.plan(n, causal=True, num_heads=H), pattern.dense_mask(n, causal=True, num_heads=H)
    q, k, v = _inputs(2, H, 1, n, n, 48)
    key_mask = torch.rand(2, n) > 0.1
    dout = torch.randn(2, H, n, 48)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    sparse_attention_reference(*ref_in, allowed, key_mask)[0].backward(dout.double())
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ins = [t.clone().requires_grad_() for t in (q, k, v)]
            sparse_attention(*ins, plan, key_mask=key_mask).backward(dout)
            grads.append([t.grad for t in ins])
    finally:
        torch.set_num_threads(before)
    for gs in grads:
        for a, r in zip(gs, ref_in):
            assert rel_err(a, r.grad) < 1e-5
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_plan_must_fit_the_call():
    """Checks only Python can make: a plan for other lengths with the same tile count, and a per-head
    plan made for another head count (its layout_heads would pass the kernels' checks)."""
    q = torch.randn(1, 4, 100, 32)
    with pytest.raises(ValueError, match="the plan is for 97 queries"):
        sparse_attention(q, q, q, SlidingWindow(8).plan(97, 100))
    bigbird = BigBird(block_size=16, random_blocks=2)
    with pytest.raises(ValueError, match="made for 1 query heads"):
        sparse_attention(q, q, q, bigbird.plan(100))
    assert sparse_attention(q, q, q, bigbird.plan(100, num_heads=4)).shape == q.shape


# -- decode path: query tiles of at most 4 rows vectorise over head_dim and keys (kDecodeRows) ----------
DECODE_PATTERNS = [
    (lambda: SlidingWindow(40, global_tokens=(0, 70)), True),       # causal window + global keys / queries
    (lambda: SlidingWindow(24, causal=True), False),                 # one-sided window pattern
    (lambda: SlidingWindow(30), False),                              # bidirectional: keys after the queries
    (lambda: BigBird(16, random_blocks=2), True),                    # per-head layout
]


@pytest.mark.parametrize("D", [64, 37])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("Sq,Sk", [(1, 130), (2, 130), (3, 130), (4, 130), (5, 130), (4, 100), (5, 100)])
def test_decode_path_every_isa(isa, Sq, Sk, dtype, D):
    """Query tiles of at most 4 rows take the decode path. Sk = 130: the queries straddle the tile
    boundary at 128 for Sq >= 3 (two query tiles of 1..3 rows each, so Sq = 5 still decodes) and the
    last key tile has 2 keys (tail lanes); Sk = 100: one query tile, Sq = 5 takes the tile path, and
    a 36-key last tile. GQA, key padding (batch row 1: nothing allowed), globals, causal and not, an
    odd head_dim; every ISA against the fp64 reference and the scalar kernels."""
    H, Hkv = 4, 2
    q, k, v = _inputs(2, H, Hkv, Sq, Sk, D, dtype)
    key_mask = torch.rand(2, Sk) > 0.2
    key_mask[1] = False
    for make, causal in DECODE_PATTERNS:
        pattern = make()
        plan = pattern.plan(Sq, Sk, causal=causal, num_heads=H)
        allowed = pattern.dense_mask(Sq, Sk, causal=causal, num_heads=H)
        results = {}
        for name in ISAS:
            if name == "avx2" and not _C.cpu_supports_avx2() or name == "avx512vnni" and not _C.cpu_supports_avx512vnni():
                continue
            isa(name)
            for km in (None, key_mask):
                out, _ = _check_forward(q, k, v, plan, allowed, km, scale=0.2)
            out, lse = sparse_attention_with_lse(q, k, v, plan, key_mask=key_mask)
            assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
            results[name] = (out, lse)
        ref = results.pop("scalar")
        tol = 2e-6 if dtype == F32 else 1e-2
        for name, res in results.items():
            for a, b in zip(res, ref):
                fin = torch.isfinite(b)
                assert torch.equal(fin, torch.isfinite(a)), name
                assert rel_err(a[fin], b[fin]) < tol, (name, rel_err(a[fin], b[fin]))
