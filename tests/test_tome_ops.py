"""CPU kernels of the token merging ops (slimformer.ops.tome_match / tome_merge) against the fp64
reference (slimformer.tome.reference): awkward sizes, every dtype, ToMe's alternate roles, protected,
scattered and random roles, padding, NaN and zero metric rows, exact ties, ISA parity, properties,
gradients, opcheck, torch.compile and input errors.

The match kernel computes cosines in fp32, the reference in fp64, so on random inputs a near-tie may
legitimately go the other way. _check_match therefore always checks that the kernel's choices are
optimal within TOL under the fp64 cosines (and consistent with its own scores exactly), and demands
the reference's exact answer wherever the reference's margin exceeds TOL; inputs built with clear
margins (and exact duplicates, whose ties both sides must break by index) are compared exactly.
"""
from __future__ import annotations

import pytest
import torch

from slimformer import _C
from slimformer.ops.tome import tome_match, tome_merge
from slimformer.tome.reference import (NORM_EPS, ROLE_DESTINATION, ROLE_KEEP, ROLE_SOURCE, SCORE_NO_DESTINATION,
                                       SCORE_PADDING, alternate_roles, match_reference, merge_reference)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
ISAS = ["scalar", "avx2", "avx512vnni"]
TOL = 1e-5  # fp32 cosine vs fp64 cosine
MERGE_TOL = {F32: 1e-6, F16: 1e-2, BF16: 1e-2}
INF = float("inf")


def rel_err(y, ref):
    y, ref = y.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(y - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def _supported(name):
    return not (name == "avx2" and not _C.cpu_supports_avx2() or name == "avx512vnni" and not _C.cpu_supports_avx512vnni())


def _cos64(metric):
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return m @ m.transpose(1, 2)


def _slots_from(merged, dst):
    keep = ~merged
    surv = keep.long().cumsum(1) - 1
    return torch.where(keep, surv, surv.gather(1, dst.clamp_min(0)))


def _merged(m, roles):
    """Sources that merged: their slot is their destination's (survivors have distinct slots)."""
    B, N = roles.shape
    idx = torch.arange(N).expand(B, N)
    return (roles == ROLE_SOURCE) & (m.dst != idx) & (m.slot == m.slot.gather(1, m.dst.clamp_min(0)))


def _top_r(score, roles, r):
    """Bool [B, N]: the r sources first by (score desc, index asc), from any score tensor."""
    s = score.double().masked_fill(roles != ROLE_SOURCE, -INF)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :r]
    return torch.zeros_like(roles, dtype=torch.bool).scatter_(1, order, True)


def _check_match(metric, sizes, roles, r, *, exact=False):
    """Kernel vs reference as described in the module docstring; exact=True demands the reference's
    answer everywhere (inputs with clear margins or exact ties). Returns the kernel's Match."""
    got = tome_match(metric, sizes, roles, r)
    ref = match_reference(metric, sizes, roles, r)
    B, N = sizes.shape
    assert got.slot.shape == got.dst.shape == got.score.shape == (B, N)
    assert got.slot.dtype == got.dst.dtype == torch.int64 and got.score.dtype == F32
    src = roles == ROLE_SOURCE
    real = sizes > 0
    # Non-sources.
    assert (got.dst[~src] == -1).all() and (got.score[~src] == -INF).all()
    # Sources with nothing to match (no real destination, or NaN only): exactly the reference.
    cos = _cos64(metric)
    allowed = ((roles == ROLE_DESTINATION) & real)[:, None, :] & ~cos.isnan()
    found = src & allowed.any(-1)
    nf = src & ~found
    assert torch.equal(got.dst[nf], ref.dst[nf]) and torch.equal(got.score[nf], ref.score[nf])
    # Sources with a match: an allowed destination, optimal within TOL; score = its cosine (or padding).
    gd = got.dst.clamp_min(0)[..., None]
    assert allowed.gather(2, gd)[..., 0][found].all()
    chosen = cos.gather(2, gd)[..., 0]
    masked = cos.masked_fill(~allowed, -INF)
    top2 = masked.topk(min(2, N), dim=-1).values
    best = top2[..., 0]
    assert ((best - chosen)[found] <= TOL).all(), float((best - chosen)[found].max())
    assert ((got.score.double() - chosen)[found & real].abs() <= TOL).all()
    assert (got.score[found & ~real] == SCORE_PADDING).all()
    # Selection: exactly r per row, the kernel's own top r, and the reference's top r within TOL.
    merged = _merged(got, roles)
    assert (merged.sum(1) == r).all()
    assert torch.equal(merged, _top_r(got.score, roles, r))
    if r > 0:
        rs = ref.score.double()
        lo = rs.masked_fill(~merged, INF).min(1).values
        hi = rs.masked_fill(~(src & ~merged), -INF).max(1).values
        assert (lo >= hi - TOL).all()
    assert torch.equal(got.slot, _slots_from(merged, got.dst))
    # Where the reference is unambiguous, its exact answer.
    second = top2[..., 1] if N > 1 else torch.full_like(best, -INF)
    clear_dst = found & (best - second > TOL)
    ref_merged = _merged(ref, roles)
    sorted_ref = ref.score.double().masked_fill(~src, -INF).sort(1, descending=True).values
    clear_sel = torch.ones(B, dtype=torch.bool)
    if r > 0:
        nsrc = src.sum(1)
        below = torch.where(nsrc > r, sorted_ref[:, min(r, N - 1)], torch.full((B,), -INF, dtype=torch.float64))
        clear_sel = sorted_ref[:, r - 1] - below > TOL
    if exact:
        assert torch.equal(got.dst, ref.dst) and torch.equal(got.slot, ref.slot)
        assert torch.equal(merged, ref_merged)
        torch.testing.assert_close(got.score, ref.score, atol=TOL, rtol=0)
    else:
        assert torch.equal(got.dst[clear_dst], ref.dst[clear_dst])
        assert torch.equal(merged[clear_sel], ref_merged[clear_sel])
        rows = clear_sel & (clear_dst | ~found).all(1)
        assert torch.equal(got.slot[rows], ref.slot[rows])
    return got


def _r_values(roles):
    na = int((roles == ROLE_SOURCE).sum(1).min()) if roles.numel() else 0
    has_dst = bool((roles == ROLE_DESTINATION).any(1).all())
    if not has_dst:
        return [0]
    return sorted({0, min(1, na), na // 3, na // 2, na})


# -- match: random inputs, ToMe's roles --------------------------------------------------------------------
@pytest.mark.parametrize("N", [1, 2, 3, 17, 130, 197, 577])
@pytest.mark.parametrize("C", [1, 7, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_match_random_alternate(N, C, dtype):
    for B in (1, 3):
        if N >= 577 and B == 3 and C != 64:
            continue  # keep the file fast: one big case per dtype suffices
        metric = torch.randn(B, N, C).to(dtype)
        sizes = torch.ones(B, N)
        roles = alternate_roles(B, N)
        for r in _r_values(roles):
            _check_match(metric, sizes, roles, r)


@pytest.mark.parametrize("mode", ["protect1", "protect2", "scattered", "random"])
@pytest.mark.parametrize("N", [3, 17, 197])
@pytest.mark.parametrize("dtype", DTYPES)
def test_match_roles(mode, N, dtype):
    B, C = 3, 64
    if mode == "protect1":
        prot = torch.arange(N) < 1
        roles = alternate_roles(B, N, prot)
    elif mode == "protect2":  # DeiT: class + distillation token
        prot = torch.arange(N) < 2
        roles = alternate_roles(B, N, prot)
    elif mode == "scattered":
        prot = torch.rand(B, N) < 0.2
        roles = alternate_roles(B, N, prot)
    else:
        roles = torch.randint(0, 3, (B, N), dtype=torch.int8)
        roles[:, 0] = ROLE_DESTINATION  # at least one destination and one source per row
        roles[:, -1] = ROLE_SOURCE
    metric = torch.randn(B, N, C).to(dtype)
    sizes = torch.randint(1, 5, (B, N)).float()  # sizes do not change the matching, only padding does
    for r in _r_values(roles):
        m = _check_match(metric, sizes, roles, r)
        # Protected tokens never merge nor receive.
        keep = roles == ROLE_KEEP
        merged = _merged(m, roles)
        assert not merged[keep].any()
        targets = torch.where(merged, m.dst, torch.full_like(m.dst, -1))
        for b in range(B):
            t = targets[b][targets[b] >= 0]
            assert (roles[b, t] == ROLE_DESTINATION).all()


# -- padding ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [17, 197])
def test_match_padding(dtype, N):
    B, C = 4, 64
    prot = torch.arange(N) < 1
    roles = alternate_roles(B, N, prot)
    metric = torch.randn(B, N, C).to(dtype)
    n_real = [N, N - 5, N // 2, 0]  # row 3: whole-row padding
    sizes = torch.zeros(B, N)
    for b, n in enumerate(n_real):
        sizes[b, :n] = torch.rand(n) + 0.5
    for r in _r_values(roles):
        m = _check_match(metric, sizes, roles, r)
        # Padding sources score SCORE_PADDING, the fully padded row only sentinels.
        src = roles == ROLE_SOURCE
        assert (m.score[src & (sizes == 0)] == SCORE_PADDING).all()
        # Padding destinations never receive.
        real_dst = (roles == ROLE_DESTINATION) & (sizes > 0)
        fr = src & real_dst.any(1, keepdim=True)
        assert real_dst.gather(1, m.dst.clamp_min(0))[fr].all()
    # A padded row merges its real tokens exactly as it would alone (kernel vs kernel, bit-exact).
    for b in (1, 2):
        n = n_real[b]
        na = int((roles[b, :n] == ROLE_SOURCE).sum())
        for r in (1, na // 2, na):
            full = tome_match(metric[b:b + 1], sizes[b:b + 1], roles[b:b + 1], r)
            alone = tome_match(metric[b:b + 1, :n], sizes[b:b + 1, :n], roles[b:b + 1, :n], r)
            assert torch.equal(full.slot[:, :n], alone.slot)
            assert torch.equal(full.dst[:, :n], alone.dst)
            assert torch.equal(full.score[:, :n], alone.score)


def test_match_no_real_destination():
    """Every destination padded: real sources score SCORE_NO_DESTINATION (below padding) and go to the
    first destination; a row without any destination is fine with r = 0."""
    B, N, C = 2, 9, 16
    metric = torch.randn(B, N, C)
    roles = alternate_roles(B, N)
    sizes = torch.ones(B, N)
    sizes[:, 1::2] = 0
    sizes[1, 4] = 0  # a padding source
    for r in range(0, 6):
        m = _check_match(metric, sizes, roles, r, exact=True)
    assert m.score[0, 0] == SCORE_NO_DESTINATION and m.dst[0, 0] == 1
    assert m.score[1, 4] == SCORE_PADDING
    only_src = torch.zeros(1, 5, dtype=torch.int8)
    m = _check_match(torch.randn(1, 5, 3), torch.ones(1, 5), only_src, 0, exact=True)
    assert torch.equal(m.slot, torch.arange(5)[None])


# -- NaN, zero vectors, huge values, exact ties ------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_match_nan_and_zero_rows(dtype):
    B, N, C = 2, 41, 24
    metric = torch.randn(B, N, C)
    metric[0, 4] = float("nan")       # a NaN source: no destination, first destination
    metric[0, 7, 3] = float("nan")    # a NaN destination: never chosen
    metric[1, 10] = 0                 # a zero source: cosine 0 with everything, lowest index wins
    metric[1, 9] = 0                  # a zero destination: cosine 0
    metric[1, 20, 0] = float("inf")   # inf: NaN cosines, like NaN
    metric = metric.to(dtype)
    roles = alternate_roles(B, N)
    sizes = torch.ones(B, N)
    for r in _r_values(roles):
        m = _check_match(metric, sizes, roles, r)
        assert m.score[0, 4] == SCORE_NO_DESTINATION and m.dst[0, 4] == 1
        assert not (m.dst[0] == 7).any()
        assert m.dst[1, 10] == 1 and m.score[1, 10] == 0  # every cosine 0: the first destination
        assert m.score[1, 20] == SCORE_NO_DESTINATION


def test_match_huge_values():
    """|x| ~ 1e30: the fp32 sum of squares overflows; the kernel rescales and matches fp64."""
    B, N, C = 2, 33, 16
    metric = torch.randn(B, N, C)
    metric[0] *= 1e30
    metric[1, ::3] *= 1e-30
    roles = alternate_roles(B, N)
    for r in _r_values(roles):
        _check_match(metric, torch.ones(B, N), roles, r)
    _check_match(metric.bfloat16(), torch.ones(B, N), roles, 5)


def _separated(B, N, C, roles, dup=True):
    """Metric with clear margins and exact duplicates: destinations are copies of a few random base
    vectors (duplicates tie exactly: lower index must win), sources are base + noise of distinct
    levels (well separated scores), each source vector used twice (ranking ties: lower index first)."""
    metric = torch.empty(B, N, C, dtype=torch.float64)
    for b in range(B):
        dsts = (roles[b] != ROLE_SOURCE).nonzero()[:, 0]
        srcs = (roles[b] == ROLE_SOURCE).nonzero()[:, 0]
        n_base = max(1, len(dsts) // 3)
        base = torch.nn.functional.normalize(torch.randn(n_base, C, dtype=torch.float64), dim=-1)
        metric[b, dsts] = base[torch.randint(0, n_base, (len(dsts),))]
        n_src = max(1, (len(srcs) + 1) // 2) if dup else len(srcs)
        levels = torch.randperm(n_src).double() * (0.6 / max(n_src, 1)) + 0.05
        noise = torch.nn.functional.normalize(torch.randn(n_src, C, dtype=torch.float64), dim=-1)
        vecs = base[torch.randint(0, n_base, (n_src,))] + levels[:, None] * noise
        pick = torch.randperm(len(srcs)) % n_src
        metric[b, srcs] = vecs[pick]
    return metric.float()


def _signs(B, N, C, n_distinct, dtype=F32):
    """Rows of +-2^e (C a power of 4, so every norm is a power of 2): normalising and every cosine
    (a multiple of 1 / C) are exact in fp32 and fp64 alike, so the many exact ties -- equal cosines
    of different vectors and duplicated rows -- must be broken by index on both sides. Rows are
    drawn from n_distinct sign vectors per batch row (duplicates) with random power-of-2 scales."""
    base = torch.randint(0, 2, (B, n_distinct, C)).double() * 2 - 1
    pick = torch.randint(0, n_distinct, (B, N))
    scale = torch.exp2(torch.randint(-3, 4, (B, N, 1)).double())
    return (base.gather(1, pick[..., None].expand(B, N, C)) * scale).to(dtype)


@pytest.mark.parametrize("C", [1, 4, 16, 64])
@pytest.mark.parametrize("N", [17, 130, 197])
@pytest.mark.parametrize("dtype", DTYPES)
def test_match_exact_ties(C, N, dtype):
    B = 3
    roles = alternate_roles(B, N, torch.arange(N) < 1)
    sizes = torch.ones(B, N)
    sizes[2, N - N // 4:] = 0
    for n_distinct in (3, N // 2):
        metric = _signs(B, N, C, n_distinct, dtype)
        for r in _r_values(roles) + [3, 7]:
            m = _check_match(metric, sizes, roles, r, exact=True)
            # Every chosen destination is the first of its exactly tied candidates.
            cos = _cos64(metric)
            for b in range(B):
                for i in (roles[b] == ROLE_SOURCE).nonzero()[:, 0]:
                    d = int(m.dst[b, i])
                    ok = (roles[b, :d] == ROLE_DESTINATION) & (sizes[b, :d] > 0)
                    assert not (cos[b, i, :d][ok] >= cos[b, i, d]).any()
            # Ranking ties: no merged source has an unmerged tied source before it.
            merged = _merged(m, roles)
            for b in range(B):
                s = m.score[b]
                for i in (merged[b]).nonzero()[:, 0]:
                    before = (roles[b, :i] == ROLE_SOURCE) & (s[:i] == s[i]) & ~merged[b, :i]
                    assert not before.any()


# -- ISA parity ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_match_isa_parity(isa, dtype):
    B, N, C = 3, 197, 64
    roles = alternate_roles(B, N, torch.arange(N) < 1)
    sep = _separated(B, N, C, roles).to(dtype)
    rnd = torch.randn(B, N, C).to(dtype)
    sizes = torch.ones(B, N)
    sizes[1, 150:] = 0
    results = {}
    for name in ISAS:
        if not _supported(name):
            continue
        isa(name)
        results[name] = [tome_match(sep, sizes, roles, 40), _check_match(rnd, sizes, roles, 40)]
    ref = results.pop("scalar")
    for name, res in results.items():
        assert torch.equal(res[0].dst, ref[0].dst) and torch.equal(res[0].slot, ref[0].slot), name
        for a, b in zip(res, ref):
            torch.testing.assert_close(a.score, b.score, atol=2e-6, rtol=0)


@pytest.mark.parametrize("N,C", [(1, 1), (3, 5), (17, 7), (40, 19), (130, 128), (577, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_match_every_isa(isa, N, C, dtype):
    roles = alternate_roles(2, N, torch.arange(N) < 1)
    metric = torch.randn(2, N, C).to(dtype)
    sizes = torch.ones(2, N)
    sizes[1, N // 2:] = 0
    for name in ISAS:
        if _supported(name):
            isa(name)
            for r in _r_values(roles):
                _check_match(metric, sizes, roles, r)


def test_match_threads_chunks():
    """One long row splits its sources across threads (chunks); same answer as batched rows."""
    N, C = 1401, 64
    roles = alternate_roles(1, N, torch.arange(N) < 1)
    metric = torch.randn(1, N, C)
    sizes = torch.ones(1, N)
    one = _check_match(metric, sizes, roles, 300)
    three = tome_match(metric.expand(3, N, C), sizes.expand(3, N), roles.expand(3, N), 300)
    for f in range(3):
        assert torch.equal(three.slot[f], one.slot[0]) and torch.equal(three.dst[f], one.dst[0])
        assert torch.equal(three.score[f], one.score[0])


# -- merge ---------------------------------------------------------------------------------------------------
def _random_slots(B, N, n_out, unreached=True):
    """Slots with every output reached (first n_out inputs in order) plus random ones; some outputs
    stay empty when unreached."""
    slot = torch.randint(0, n_out, (B, N))
    if not unreached and N >= n_out:
        slot[:, :n_out] = torch.arange(n_out)
    return slot


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", [(1, 1), (3, 7), (17, 64), (130, 33), (197, 768), (577, 96)])
def test_merge_random(dtype, N, D):
    for B in (1, 3):
        x = torch.randn(B, N, D).to(dtype)
        sizes = torch.rand(B, N) * 3
        sizes[:, ::5] = 0  # padding
        for n_out in sorted({1, max(1, N // 2), N}):
            slot = _random_slots(B, N, n_out, unreached=n_out > 1)
            out, out_sizes = tome_merge(x, sizes, slot, n_out)
            ref, ref_sizes = merge_reference(x, sizes, slot, n_out)
            assert out.dtype == dtype and out.shape == (B, n_out, D) and out_sizes.dtype == F32
            torch.testing.assert_close(out_sizes, ref_sizes, rtol=1e-6, atol=1e-6)
            assert rel_err(out, ref) <= MERGE_TOL[dtype], rel_err(out, ref)
            # sizes are conserved
            torch.testing.assert_close(out_sizes.double().sum(1), sizes.double().sum(1), rtol=1e-6, atol=1e-5)


def test_merge_weights_padding_only_slot():
    """A slot reached only by size-0 inputs averages them unweighted; an unreached slot is 0."""
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [5.0, 10.0], [7.0, 7.0]]])
    sizes = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    slot = torch.tensor([[0, 0, 1, 1]])
    out, s = tome_merge(x, sizes, slot, 3)
    torch.testing.assert_close(out, torch.tensor([[[2.0, 4.0], [5.0, 10.0], [0.0, 0.0]]]))
    torch.testing.assert_close(s, torch.tensor([[0.0, 2.0, 0.0]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_isa_parity(isa, dtype):
    B, N, D = 2, 197, 200  # D: 12 AVX-512 vectors + 8 tail columns
    x = torch.randn(B, N, D).to(dtype)
    sizes = torch.rand(B, N)
    slot = _random_slots(B, N, 150)
    results = {}
    for name in ISAS:
        if _supported(name):
            isa(name)
            results[name] = tome_merge(x, sizes, slot, 150)
            ref = merge_reference(x, sizes, slot, 150)
            assert rel_err(results[name][0], ref[0]) <= MERGE_TOL[dtype]
    base = results.pop("scalar")
    for name, res in results.items():
        assert torch.equal(res[1], base[1])
        assert rel_err(res[0], base[0]) <= (2e-7 if dtype == F32 else 1e-2), name


def test_merge_after_match_properties():
    """match -> merge: sizes conserved, survivors in order, protected tokens untouched."""
    B, N, C, D = 3, 197, 64, 48
    prot = torch.zeros(N, dtype=torch.bool)
    prot[[0, 50, 51]] = True
    roles = alternate_roles(B, N, prot)
    metric, x = torch.randn(B, N, C), torch.randn(B, N, D)
    sizes = torch.rand(B, N) + 0.5
    r = 60
    m = tome_match(metric, sizes, roles, r)
    out, out_sizes = tome_merge(x, sizes, m.slot, N - r)
    merged = _merged(m, roles)
    surv_slots = m.slot.masked_select(~merged).view(B, N - r)
    assert torch.equal(surv_slots, torch.arange(N - r).expand(B, -1))
    torch.testing.assert_close(out_sizes.sum(1), sizes.sum(1))
    for p in (0, 50, 51):  # protected: alone in their slot, value unchanged
        for b in range(B):
            assert (m.slot[b] == m.slot[b, p]).sum() == 1
            torch.testing.assert_close(out[b, m.slot[b, p]], x[b, p])


def test_merge_backward():
    B, N, D, n_out = 2, 37, 24, 20
    x = torch.randn(B, N, D)
    sizes = torch.rand(B, N)
    sizes[:, :4] = 0
    slot = _random_slots(B, N, n_out)
    slot[:, :2] = 19  # slot 19: padding only if nothing else lands there
    g = torch.randn(B, n_out, D)
    xa = x.clone().requires_grad_()
    tome_merge(xa, sizes, slot, n_out)[0].backward(g)
    xb = x.clone().requires_grad_()
    merge_reference(xb, sizes, slot, n_out)[0].backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
    xh = x.half().requires_grad_()
    tome_merge(xh, sizes, slot, n_out)[0].backward(g.half())
    assert xh.grad.dtype == F16
    assert rel_err(xh.grad, xb.grad) < 1e-2


# -- edge cases ---------------------------------------------------------------------------------------------
def test_empty_and_tiny():
    m = tome_match(torch.randn(0, 5, 4), torch.ones(0, 5), torch.zeros(0, 5, dtype=torch.int8), 2)
    assert m.slot.shape == (0, 5)
    out, s = tome_merge(torch.randn(0, 5, 4), torch.ones(0, 5), torch.zeros(0, 5, dtype=torch.long), 3)
    assert out.shape == (0, 3, 4) and s.shape == (0, 3)
    # r = 0 is the identity
    N = 10
    m = tome_match(torch.randn(2, N, 3), torch.ones(2, N), alternate_roles(2, N), 0)
    assert torch.equal(m.slot, torch.arange(N).expand(2, N))
    x = torch.randn(2, N, 5)
    out, s = tome_merge(x, torch.ones(2, N), m.slot, N)
    assert torch.equal(out, x)
    # D = 0
    out, s = tome_merge(torch.randn(2, N, 0), torch.ones(2, N), m.slot, N)
    assert out.shape == (2, N, 0) and torch.equal(s, torch.ones(2, N))


def test_strided_inputs_direct_op():
    """The op itself (without the wrapper's .contiguous()) accepts strided tensors."""
    B, N, C = 2, 31, 16
    metric = torch.randn(B, C, N).transpose(1, 2)
    sizes = torch.ones(N, B).t()
    roles = alternate_roles(B, N).t().contiguous().t()
    got = torch.ops.slimformer.tome_match(metric, sizes, roles, 5)
    ref = tome_match(metric.contiguous(), sizes.contiguous(), roles.contiguous(), 5)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    x = torch.randn(B, 8, N).transpose(1, 2)
    out, s = torch.ops.slimformer.tome_merge(x, sizes, got[0], N - 5)
    ref_out, ref_s = merge_reference(x, sizes, got[0], N - 5)
    assert rel_err(out, ref_out) < 1e-6


# -- dispatcher integration ---------------------------------------------------------------------------------
def _op_inputs(dtype=F32):
    B, N, C, D = 2, 29, 16, 24
    roles = alternate_roles(B, N, torch.arange(N) < 1)
    metric = _separated(B, N, C, roles, dup=False).to(dtype)  # no near-ties: deterministic across paths
    return metric, torch.rand(B, N) + 0.5, roles, torch.randn(B, N, D, dtype=dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_opcheck(dtype):
    metric, sizes, roles, x = _op_inputs(dtype)
    r = 6
    torch.library.opcheck(torch.ops.slimformer.tome_match.default, (metric, sizes, roles, r))
    slot = torch.ops.slimformer.tome_match(metric, sizes, roles, r)[0]
    torch.library.opcheck(torch.ops.slimformer.tome_merge.default, (x.requires_grad_(), sizes, slot, x.shape[1] - r))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    metric, sizes, roles, x = _op_inputs()
    r = 6
    proj = torch.nn.Linear(x.shape[-1], x.shape[-1])

    def f(metric, x, sizes):
        m = tome_match(metric, sizes, roles, r)
        out, s = tome_merge(proj(x), sizes, m.slot, x.shape[1] - r)
        return out * s[..., None]

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(metric, x, sizes), f(metric, x, sizes))
    if backend == "inductor":
        return
    xg = x.clone().requires_grad_()
    compiled(metric, xg, sizes).sum().backward()
    xe = x.clone().requires_grad_()
    f(metric, xe, sizes).sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad)


# -- bad input ----------------------------------------------------------------------------------------------
def _bad_match(kind):
    B, N, C = 2, 9, 4
    metric, sizes, roles, r = torch.randn(B, N, C), torch.ones(B, N), alternate_roles(B, N), 2
    if kind == "metric-dtype":
        metric = metric.double()
    elif kind == "metric-ndim":
        metric = metric[0]
    elif kind == "sizes-dtype":
        sizes = sizes.double()
    elif kind == "sizes-shape":
        sizes = sizes[:, :-1]
    elif kind == "roles-dtype":
        roles = roles.long()
    elif kind == "roles-range":
        roles = roles.clone()
        roles[1, 3] = 3
    elif kind == "negative-size":
        sizes = sizes.clone()
        sizes[0, 2] = -1
    elif kind == "nan-size":
        sizes = sizes.clone()
        sizes[0, 2] = float("nan")
    elif kind == "r-negative":
        r = -1
    elif kind == "r-too-large":
        r = 6
    elif kind == "no-destination":
        roles = roles.clone()
        roles[1][roles[1] == ROLE_DESTINATION] = ROLE_KEEP
    elif kind == "no-channels":
        metric = torch.randn(B, N, 0)
    return metric, sizes, roles, r


MATCH_BAD = {
    "metric-dtype": "metric must be float32, float16 or bfloat16", "metric-ndim": r"metric must be \[B, N, C\]",
    "sizes-dtype": "sizes must be Float", "sizes-shape": r"sizes.* must be \[B, N\]", "roles-dtype": "roles must be Char",
    "roles-range": r"roles\[1, 3\] = 3", "negative-size": r"sizes\[0, 2\] = -1", "nan-size": r"sizes\[0, 2\] = nan",
    "r-negative": "r must be >= 0", "r-too-large": "at least r = 6 source", "no-destination": "destination",
    "no-channels": "at least one channel",
}


@pytest.mark.parametrize("kind", list(MATCH_BAD))
def test_match_bad_input(kind):
    metric, sizes, roles, r = _bad_match(kind)
    with pytest.raises(ValueError, match=MATCH_BAD[kind]):
        torch.ops.slimformer.tome_match(metric, sizes, roles, r)
    with pytest.raises(ValueError):
        tome_match(metric, sizes, roles, r)


def _bad_merge(kind):
    B, N, D, n_out = 2, 9, 4, 5
    x, sizes, slot = torch.randn(B, N, D), torch.ones(B, N), torch.randint(0, n_out, (B, N))
    if kind == "x-dtype":
        x = x.double()
    elif kind == "x-ndim":
        x = x[0]
    elif kind == "sizes-shape":
        sizes = sizes[:1]
    elif kind == "slot-dtype":
        slot = slot.int()
    elif kind == "slot-range":
        slot = slot.clone()
        slot[1, 4] = n_out
    elif kind == "slot-negative":
        slot = slot.clone()
        slot[0, 0] = -1
    elif kind == "negative-size":
        sizes = sizes.clone()
        sizes[1, 1] = -0.5
    elif kind == "n-out-negative":
        n_out = -1
    return x, sizes, slot, n_out


MERGE_BAD = {
    "x-dtype": "x must be float32, float16 or bfloat16", "x-ndim": r"x must be \[B, N, D\]",
    "sizes-shape": r"sizes must be \[B, N\]", "slot-dtype": "slot must be Long", "slot-range": r"slot\[1, 4\] = 5",
    "slot-negative": r"slot\[0, 0\] = -1", "negative-size": r"sizes\[1, 1\] = -0.5", "n-out-negative": "n_out must be >= 0",
}


@pytest.mark.parametrize("kind", list(MERGE_BAD))
def test_merge_bad_input(kind):
    x, sizes, slot, n_out = _bad_merge(kind)
    if kind != "x-ndim":
        with pytest.raises(ValueError, match=MERGE_BAD[kind]):
            torch.ops.slimformer.tome_merge(x, sizes, slot, n_out)
    with pytest.raises(ValueError, match=MERGE_BAD[kind]):
        tome_merge(x, sizes, slot, n_out)
