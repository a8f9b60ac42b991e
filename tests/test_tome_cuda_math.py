"""The token merging CUDA kernels' math, and host replays of the kernels, on the CPU.

csrc/tome/tome_cuda_math.h holds everything the kernels (csrc/tome/tome_cuda.cu) compute except
launches, barriers, shuffles / ballots / match_any, smem staging and the hardware fp16/bf16
conversions; slimformer._C._test_tome_cuda_* exposes the same functions (compiled into every build,
CPU-only too). ``_test_tome_cuda_emulate_match`` / ``_merge`` run every CTA, warp and lane of the real
launch grids through the same code, bit-exact to the GPU (explicit fmaf everywhere), and are checked here
against the fp64 reference (slimformer.tome.reference); tests/test_tome_cuda.py compares the GPU with
the same replays bit for bit.

Matching in fp32 can differ from the fp64 reference only at near ties, so check_match accepts a
different destination only if its fp64 cosine is within 1e-5 of the best, requires the slots to follow
*exactly* from the kernel's own scores and destinations by the reference's ranking rule, and accepts a
different merged set only among scores within 1e-5 of the cut. Exact ties (duplicated rows) must follow
the tie rules exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimformer import _C
from slimformer.tome.reference import (
    ROLE_DESTINATION,
    ROLE_KEEP,
    ROLE_SOURCE,
    SCORE_NO_DESTINATION,
    SCORE_PADDING,
    alternate_roles,
    match_reference,
    merge_reference,
)

CONST = _C._test_tome_cuda_constants()
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
COS_TOL = 1e-5


# ---- helpers shared with tests/test_tome_cuda.py ----
def emulate_match(metric, sizes, roles, r):
    """The CUDA match kernels replayed: (slot, dst, score, flags) as torch tensors / tuple."""
    slot, dst, score, flags = _C._test_tome_cuda_emulate_match(
        metric.float().contiguous().numpy(), sizes.float().contiguous().numpy(),
        roles.to(torch.int8).contiguous().numpy(), int(r))
    return torch.from_numpy(slot), torch.from_numpy(dst), torch.from_numpy(score), tuple(flags)


def emulate_merge(x, sizes, slot, n_out, vec=1):
    """The CUDA merge kernels replayed: (out in x.dtype, out_sizes, flags, ptr, order)."""
    acc, out_sizes, flags, ptr, order = _C._test_tome_cuda_emulate_merge(
        x.float().contiguous().numpy(), sizes.float().contiguous().numpy(), slot.contiguous().numpy(), int(n_out),
        int(vec))
    # The kernel's store rounds to nearest even, as torch's conversion does.
    return (torch.from_numpy(acc).to(x.dtype), torch.from_numpy(out_sizes), tuple(flags), torch.from_numpy(ptr),
            torch.from_numpy(order))


def selection_slots(score, dst, r):
    """The reference's ranking and slot rule applied to given scores and destinations."""
    B, N = score.shape
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :r]
    keep = torch.ones(B, N, dtype=torch.bool)
    keep.scatter_(1, order, False)
    surv = keep.long().cumsum(1) - 1
    return torch.where(keep, surv, surv.gather(1, dst.clamp_min(0)))


def check_match(metric, sizes, roles, r, slot, dst, score, exact=False):
    """Kernel outputs (CPU tensors) against match_reference; exact=True demands identical outputs."""
    ref = match_reference(metric, sizes, roles, r)
    slot, dst, score = slot.cpu(), dst.cpu(), score.cpu()
    assert slot.dtype == torch.int64 and dst.dtype == torch.int64 and score.dtype == torch.float32
    if exact:
        assert torch.equal(dst, ref.dst)
        assert torch.equal(slot, ref.slot)
        torch.testing.assert_close(score, ref.score, rtol=0, atol=COS_TOL)
        return ref
    src = roles == ROLE_SOURCE
    assert torch.equal(dst[~src], torch.full_like(dst[~src], -1))
    assert bool((score[~src] == float("-inf")).all())
    sentinel = (ref.score == SCORE_NO_DESTINATION) & src
    assert torch.equal(score[sentinel], ref.score[sentinel])
    assert torch.equal(dst[sentinel], ref.dst[sentinel])
    pad = (ref.score == SCORE_PADDING) & src
    assert torch.equal(score[pad], ref.score[pad])
    found = src & ~sentinel & ~pad
    torch.testing.assert_close(score[found], ref.score[found], rtol=0, atol=COS_TOL)
    # A different destination: a real destination of (fp64) cosine within COS_TOL of the best.
    diff = src & ~sentinel & (dst != ref.dst)
    if diff.any():
        m = metric.double()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        b, i = diff.nonzero(as_tuple=True)
        j, jr = dst[b, i], ref.dst[b, i]
        assert bool((roles[b, j] == ROLE_DESTINATION).all() and (sizes[b, j] > 0).all())
        got = (m[b, i] * m[b, j]).sum(-1)
        best = (m[b, i] * m[b, jr]).sum(-1)
        assert bool((got >= best - COS_TOL).all()), (got - best).min()
    # Slots follow exactly from the kernel's own scores and destinations.
    assert torch.equal(slot, selection_slots(score, dst, r))
    # The merged set: differences only among scores within COS_TOL of the cut.
    if r > 0:
        def merged(sc):
            sel = torch.zeros_like(src)
            sel.scatter_(1, torch.sort(sc, dim=1, descending=True, stable=True).indices[:, :r], True)
            return sel
        mk, mr = merged(score), merged(ref.score)
        cut = torch.sort(ref.score, dim=1, descending=True, stable=True).values[:, r - 1:r]
        odd = mk ^ mr
        assert bool(((ref.score - cut).abs()[odd] <= 2 * COS_TOL).all())
    return ref


def make_match_case(B, N, C, dtype=F32, *, cls=True, padding=False, nan_row=False, dup_dst=False, dup_src=False,
                    roles="alternate"):
    metric = torch.randn(B, N, C).to(dtype)
    sizes = torch.ones(B, N)
    if roles == "alternate":
        prot = torch.zeros(N, dtype=torch.bool)
        if cls and N > 2:
            prot[0] = True
        rl = alternate_roles(B, N, prot)
    else:  # random roles, each row with at least one source and one destination where N allows
        rl = torch.randint(0, 3, (B, N), dtype=torch.int8)
        if N >= 2:
            rl[:, 0], rl[:, -1] = ROLE_SOURCE, ROLE_DESTINATION
    if padding:
        sizes = torch.randint(1, 4, (B, N)).float()
        sizes[0, N - N // 3:] = 0.0
        if B > 1:
            sizes[1, : N // 4] = 0.0
    if nan_row and N > 3:
        metric[0, 3] = float("nan")
        metric[-1, N - 2, 0] = float("nan")
    if dup_dst and N > 6:
        d = (rl[0] == ROLE_DESTINATION).nonzero().flatten()
        if len(d) >= 3:
            metric[0, d[2]] = metric[0, d[0]]
            metric[0, d[-1]] = metric[0, d[1]] * 3  # a multiple: the same direction, the same fp32 cosine?
    if dup_src and N > 6:
        s = (rl[0] == ROLE_SOURCE).nonzero().flatten()
        metric[0, s[-1]] = metric[0, s[0]]
        if len(s) > 2:
            metric[0, s[1]] = metric[0, s[0]]
    return metric, sizes, rl


def max_r(roles):
    has_dst = (roles == ROLE_DESTINATION).any(1).all()
    return int((roles == ROLE_SOURCE).sum(1).min()) if has_dst else 0


# ---- small functions ----
def test_constants():
    assert CONST["tile_s"] == CONST["group"] * CONST["micro"] == CONST["tile_d"]
    assert CONST["match_threads"] == CONST["group"] ** 2
    assert CONST["smem_stride"] == CONST["chunk_c"] + 1
    assert CONST["warp"] == 32 and CONST["chunk_c"] == 32
    assert CONST["max_tokens"] == 65535 * CONST["tile_s"]


def test_tile_pairs_cover_the_tile_once_and_groups_share_a_half_warp():
    pairs = _C._test_tome_cuda_tile_pairs()  # [threads, micro, micro, 2]
    T, M = CONST["match_threads"], CONST["micro"]
    flat = {tuple(p) for p in pairs.reshape(-1, 2)}
    assert len(flat) == T * M * M == CONST["tile_s"] * CONST["tile_d"]
    for t in range(T):
        # sources depend on t // 16 only, destinations on t % 16 only: the tx butterfly (xor < 16) stays in
        # one half-warp and combines argmaxes of the same sources over disjoint destinations
        assert (pairs[t, :, :, 0] == pairs[(t // 16) * 16, :, :, 0]).all()
        assert (pairs[t, :, :, 1] == pairs[t % 16, :, :, 1]).all()
        assert (t // 32) == ((t ^ 8) // 32) and (t // 16) == ((t ^ 1) // 16)


def test_stage_map_is_a_bijection_with_conflict_free_warps():
    sm = _C._test_tome_cuda_stage_map()  # e -> (row, col, smem index)
    S, CC, stride = CONST["tile_s"], CONST["chunk_c"], CONST["smem_stride"]
    assert sorted(map(tuple, sm[:, :2])) == [(r, c) for r in range(S) for c in range(CC)]
    assert (sm[:, 2] == sm[:, 0] * stride + sm[:, 1]).all()
    assert len(set(sm[:, 2])) == S * CC and sm[:, 2].max() < S * stride
    for w in range(len(sm) // 32):  # a warp's staging stores hit 32 distinct banks
        assert len(set(sm[32 * w: 32 * w + 32, 2] % 32)) == 32
    pairs = _C._test_tome_cuda_tile_pairs()
    for c in (0, 5, 31):  # the compute loop's destination reads: 16 tx lanes, 16 distinct banks
        for k in range(CONST["micro"]):
            rows = pairs[:16, 0, k, 1]
            assert len({(int(r) * stride + c) % 32 for r in rows}) == 16


def test_best_update_and_combine_are_the_sequential_argmax():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 40))
        v = rng.choice([0.5, 0.25, -1.0, np.nan, 0.75, 0.5], size=n).astype(np.float32)
        j = rng.permutation(1000)[:n].astype(np.int32)
        seq = _C._test_tome_cuda_best_scan(v.tolist(), j.tolist())
        ok = ~np.isnan(v)
        if ok.any():
            top = v[ok].max()
            assert seq == (pytest.approx(float(top)), int(j[ok & (v == top)].min()))
        else:
            assert seq[0] == float("-inf") and seq[1] == 2**31 - 1
        # any split into partial argmaxes, combined in any order, gives the same
        parts = np.array_split(rng.permutation(n), int(rng.integers(1, 6)))
        acc = _C._test_tome_cuda_best_init()
        for p in parts:
            part = _C._test_tome_cuda_best_scan(v[p].tolist(), j[p].tolist())
            acc = _C._test_tome_cuda_best_combine(*acc, *part) if trial % 2 else _C._test_tome_cuda_best_combine(*part, *acc)
        assert acc == seq


def test_finish_source_and_fallback():
    fs = _C._test_tome_cuda_finish_source
    assert fs(1.0, 0.5, 7, 3) == (7, 0.5)
    assert fs(2.0, float("-inf"), 2**31 - 1, 3) == (3, SCORE_NO_DESTINATION)
    assert fs(0.0, 0.5, 7, 3) == (7, SCORE_PADDING)  # padding keeps its best match, scores below cosines
    assert fs(0.0, float("-inf"), 2**31 - 1, 3) == (3, SCORE_PADDING)
    assert _C._test_tome_cuda_fallback(5, 2) == 5 and _C._test_tome_cuda_fallback(2**31 - 1, 0) == 0
    assert _C._test_tome_cuda_row_feasible(3, 1, 3) and not _C._test_tome_cuda_row_feasible(2, 1, 3)
    assert not _C._test_tome_cuda_row_feasible(5, 0, 1) and _C._test_tome_cuda_row_feasible(0, 0, 0)
    k = _C._test_tome_cuda_keeps
    assert not k(ROLE_SOURCE, True, 1) and k(ROLE_SOURCE, False, 1) and k(ROLE_SOURCE, True, 0)
    assert k(ROLE_DESTINATION, True, 1) and k(ROLE_KEEP, True, 1)


def test_warp_sum_is_the_xor_butterfly():
    rng = np.random.default_rng(1)
    for _ in range(20):
        v = (rng.standard_normal(32) * 10 ** rng.uniform(-3, 3, 32)).astype(np.float32)
        a = v.copy()
        for off in (16, 8, 4, 2, 1):
            a = (a + a[np.arange(32) ^ off]).astype(np.float32)
        assert _C._test_tome_cuda_warp_sum(v.tolist()) == a[0]


def test_lane_prefix_peer_rank_and_leader():
    rng = np.random.default_rng(2)
    for _ in range(300):
        mask = int(rng.integers(1, 2**32))
        for lane in range(32):
            assert _C._test_tome_cuda_lane_prefix(mask, lane) == bin(mask & ((1 << lane) - 1)).count("1")
            if mask >> lane & 1:
                assert _C._test_tome_cuda_peer(mask, lane) == (bin(mask & ((1 << lane) - 1)).count("1"),
                                                               mask.bit_length() - 1)


@pytest.mark.parametrize("D", [1, 3, 8, 64, 100, 256, 768, 1000])
def test_merge_vectors_and_columns(D):
    for elem, vec in ((4, 4), (2, 8)):
        assert _C._test_tome_cuda_merge_vec(D, elem, True) == (vec if D % vec == 0 else 1)
        assert _C._test_tome_cuda_merge_vec(D, elem, False) == 1
        for v in {1, _C._test_tome_cuda_merge_vec(D, elem, True)}:
            cols = _C._test_tome_cuda_merge_cols(D, v)
            covered = sorted(c + e for _, _, c in cols for e in range(v))
            assert covered == list(range(D))  # every column once, no vector past D
            assert all(c % v == 0 for _, _, c in cols)


@pytest.mark.parametrize("B,N,n_out", [(1, 1, 1), (3, 197, 184), (7, 577, 600), (2, 8192, 1)])
def test_workspaces_do_not_overlap(B, N, n_out):
    w = _C._test_tome_cuda_match_workspace(B, N)
    regions = [("inv_norm", 4 * B * N), ("src_list", 4 * B * N), ("dst_list", 4 * B * N), ("row_info", 16 * B),
               ("selected", B * N), ("survivor", 4 * B * N)]
    end = 0
    for name, size in regions:
        assert w[name] % 256 == 0 and w[name] >= end
        end = w[name] + size
    assert w["bytes"] >= end
    m = _C._test_tome_cuda_merge_workspace(B, N, n_out)
    end = 0
    for name, size in (("ptr", 4 * B * (n_out + 1)), ("cursor", 4 * B * n_out), ("order", 4 * B * N)):
        assert m[name] % 256 == 0 and m[name] >= end
        end = m[name] + size
    assert m["bytes"] >= end


# ---- tome_match replay vs the fp64 reference ----
MATCH_SHAPES = [(1, 1, 1), (2, 2, 7), (2, 3, 64), (3, 17, 7), (2, 130, 128), (2, 197, 64), (1, 577, 64),
                (1, 577, 1)]


@pytest.mark.parametrize("B,N,C", MATCH_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_emulate_match_vs_reference(B, N, C, dtype):
    metric, sizes, roles = make_match_case(B, N, C, dtype)
    rmax = max_r(roles)
    for r in sorted({0, 1, rmax // 2, rmax} - ({1} if rmax < 1 else set())):
        slot, dst, score, flags = emulate_match(metric, sizes, roles, r)
        assert flags == (0, 0, 0)
        check_match(metric, sizes, roles, r, slot, dst, score)


@pytest.mark.parametrize("B,N,C", [(2, 17, 7), (3, 130, 64), (2, 577, 128)], ids=str)
@pytest.mark.parametrize("case", ["padding", "nan", "random_roles", "no_cls"])
def test_emulate_match_special_rows(B, N, C, case):
    kw = dict(padding=dict(padding=True), nan=dict(nan_row=True), random_roles=dict(roles="random"),
              no_cls=dict(cls=False, padding=True))[case]
    metric, sizes, roles = make_match_case(B, N, C, F32, **kw)
    rmax = max_r(roles)
    for r in sorted({0, 1, rmax // 3, rmax}):
        slot, dst, score, flags = emulate_match(metric, sizes, roles, r)
        assert flags == (0, 0, 0)
        ref = check_match(metric, sizes, roles, r, slot, dst, score)
        if case == "padding" and r > 0:  # real tokens merge before padding
            padded_src = (sizes == 0) & (roles == ROLE_SOURCE)
            assert bool((score[padded_src] == SCORE_PADDING).all())
        if case == "nan":
            assert score[0, 3] == SCORE_NO_DESTINATION or roles[0, 3] != ROLE_SOURCE
            assert ref is not None


def test_emulate_match_huge_rows_normalise_like_the_reference():
    """Rows whose sum of squares overflows fp32 are rescaled by their largest magnitude first."""
    metric, sizes, roles = make_match_case(2, 130, 64, F32)
    metric[0] *= 1e30
    metric[1, ::3] *= 1e25
    for r in (1, max_r(roles)):
        slot, dst, score, flags = emulate_match(metric, sizes, roles, r)
        check_match(metric, sizes, roles, r, slot, dst, score)
        assert bool((score[roles == ROLE_SOURCE] != 0).all())


def test_emulate_match_exact_ties():
    """Duplicated destinations: the lower index wins; duplicated sources: equal scores, lower index merges first."""
    for N, C in ((17, 7), (130, 64), (197, 128)):
        metric, sizes, roles = make_match_case(2, N, C, F32, dup_dst=True, dup_src=True)
        d = (roles[0] == ROLE_DESTINATION).nonzero().flatten()
        s = (roles[0] == ROLE_SOURCE).nonzero().flatten()
        # make the duplicated destination d[0] (== d[2]) every duplicated source's unique best match
        metric[0, s[0]] = metric[0, d[0]] * 0.5 + 1e-3 * torch.randn(C)
        metric[0, s[1]] = metric[0, s[0]]
        metric[0, s[-1]] = metric[0, s[0]]
        for r in (1, 2, 3, max_r(roles)):
            slot, dst, score, flags = emulate_match(metric, sizes, roles, r)
            check_match(metric, sizes, roles, r, slot, dst, score)
            assert dst[0, s[0]] == d[0] and dst[0, s[1]] == d[0] and dst[0, s[-1]] == d[0]
            assert score[0, s[0]] == score[0, s[1]] == score[0, s[-1]]
            merged = slot[0, s] == slot[0, d[0]]
            if r <= 3:  # the three tied top sources merge in index order
                assert bool(merged[0]) and bool(merged[1]) == (r >= 2) and bool(merged[-1]) == (r >= 3)


def test_emulate_match_all_equal_metric():
    """Every row the same vector: all cosines equal, every source goes to the first real destination and
    the sources merge in index order. (The kernel computes every pair's cosine by the same sequential sum,
    so identical rows tie exactly; the reference's fp64 matmul does not always: BLAS rounds entries of
    identical rows differently by position, so here the rule is checked directly.)"""
    B, N, C = 2, 33, 5
    metric = torch.randn(C).expand(B, N, C).contiguous()
    roles = alternate_roles(B, N)
    sizes = torch.ones(B, N)
    sizes[1, 1] = 0.0  # row 1: the first destination is padding: the first real one is 3
    for r in (1, 5, 17):
        slot, dst, score, _ = emulate_match(metric, sizes, roles, r)
        check_match(metric, sizes, roles, r, slot, dst, score)
        assert bool((dst[0, ::2] == 1).all()) and bool((dst[1, ::2] == 3).all())
        assert len(score[:, ::2].unique()) == 1
        merged = torch.zeros(B, N, dtype=torch.bool)
        merged[:, 0:2 * r:2] = True  # the first r sources
        keep = ~merged
        surv = keep.long().cumsum(1) - 1
        assert torch.equal(slot, torch.where(keep, surv, surv.gather(1, dst.clamp_min(0))))


def test_emulate_match_no_real_destination_and_no_destination():
    B, N, C = 3, 20, 6
    metric = torch.randn(B, N, C)
    roles = alternate_roles(B, N)
    sizes = torch.ones(B, N)
    sizes[0, 1::2] = 0.0  # row 0: destinations all padding -> every source scores -3, goes to token 1
    roles[2] = ROLE_SOURCE  # row 2: no destination at all (r = 0 only)
    slot, dst, score, flags = emulate_match(metric, sizes, roles, 0)
    assert flags == (0, 0, 0)
    ref = check_match(metric, sizes, roles, 0, slot, dst, score)
    assert bool((score[0, ::2] == SCORE_NO_DESTINATION).all()) and bool((dst[0, ::2] == 1).all())
    assert bool((dst[2] == 0).all()) and torch.equal(dst[2], ref.dst[2])  # the reference's argmax of nothing
    assert torch.equal(slot, torch.arange(N).expand(B, N))
    slot, dst, score, flags = emulate_match(metric, sizes, roles, 2)
    assert flags == (1, 0, 0)  # row 2 cannot merge; the adapter raises before the slots are used
    # rows 0 and 1 are still right
    for b in (0, 1):
        check_match(metric[b:b + 1], sizes[b:b + 1], roles[b:b + 1], 2, slot[b:b + 1], dst[b:b + 1], score[b:b + 1])


def test_emulate_match_flags():
    B, N, C = 4, 40, 3
    metric, sizes, roles = make_match_case(B, N, C)
    roles[1, 5] = 3
    roles[2, 7] = -1
    sizes[3, 2] = float("nan")
    sizes[3, 4] = -1.0
    sizes[0, 0] = float("inf")
    _, _, _, flags = emulate_match(metric, sizes, roles, 1)
    assert flags == (0, 2, 3)
    _, _, _, flags = emulate_match(metric, sizes, roles, 20)  # 19 or 20 sources per row (CLS kept)
    assert flags[0] == int(((roles == ROLE_SOURCE).sum(1) < 20).sum())


@pytest.mark.parametrize("N,C,n_dst", [(2500, 3, 90), (1100, 5, 1000)])
def test_emulate_match_long_rows(N, C, n_dst):
    """Several prepare chunks (512 tokens), rank chunks (1024 scores), rank tiles, source and destination tiles."""
    B = 2
    metric = torch.randn(B, N, C)
    roles = torch.full((B, N), ROLE_SOURCE, dtype=torch.int8)
    roles[:, torch.randperm(N)[:n_dst]] = ROLE_DESTINATION
    roles[:, 0] = ROLE_KEEP
    sizes = torch.ones(B, N)
    sizes[1, -300:] = 0.0
    rmax = max_r(roles)
    for r in (rmax // 2, rmax):
        slot, dst, score, flags = emulate_match(metric, sizes, roles, r)
        assert flags == (0, 0, 0)
        check_match(metric, sizes, roles, r, slot, dst, score)


def test_emulate_match_padded_row_merges_as_alone():
    """A row padded at the end merges its real tokens exactly as the unpadded row does."""
    N, C, pad, r = 130, 64, 31, 20
    metric = torch.randn(1, N + pad, C)
    roles = alternate_roles(1, N + pad, torch.arange(N + pad) == 0)
    sizes = torch.ones(1, N + pad)
    sizes[0, N:] = 0.0
    slot_p, dst_p, score_p, _ = emulate_match(metric, sizes, roles, r)
    slot_a, dst_a, score_a, _ = emulate_match(metric[:, :N], sizes[:, :N], roles[:, :N], r)
    assert torch.equal(slot_p[:, :N], slot_a) and torch.equal(dst_p[:, :N], dst_a)
    assert torch.equal(score_p[:, :N], score_a)


# ---- tome_merge replay vs the fp64 reference ----
def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def random_slots(B, N, n_out, kind):
    if kind == "tome":  # a ToMe-like map: from a real match
        metric, sizes, roles = make_match_case(B, N, 16)
        r = N - n_out
        return match_reference(metric, sizes, roles, r).slot
    if kind == "random":
        return torch.randint(0, n_out, (B, N))
    if kind == "one":
        return torch.full((B, N), n_out - 1, dtype=torch.int64)
    raise ValueError(kind)


MERGE_CASES = [(1, 1, 1, 1, "random"), (2, 3, 2, 7, "random"), (3, 17, 13, 64, "tome"), (2, 33, 40, 100, "random"),
               (2, 197, 184, 768, "tome"), (1, 577, 500, 64, "tome"), (2, 130, 1, 8, "one"), (1, 9, 3, 1000, "random")]


@pytest.mark.parametrize("B,N,n_out,D,kind", MERGE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_emulate_merge_vs_reference(B, N, n_out, D, kind, dtype):
    slot = random_slots(B, N, n_out, kind)
    x = torch.randn(B, N, D).to(dtype)
    sizes = torch.randint(1, 5, (B, N)).float()
    if N > 3:
        sizes[0, -2:] = 0.0  # padding: zero weight next to real tokens, 1/count where alone
    ref, ref_s = merge_reference(x, sizes, slot, n_out)
    vecs = [1] + [v for v in (16 // x.element_size(),) if D % v == 0]
    outs = []
    for vec in vecs:
        out, out_s, flags, ptr, order = emulate_merge(x, sizes, slot, n_out, vec)
        assert flags == (0, 0)
        torch.testing.assert_close(out_s, ref_s, rtol=1e-6, atol=0)
        tol = {F32: 1e-6, F16: 1e-3, BF16: 8e-3}[dtype]
        assert rel_err(out, ref) <= tol
        if dtype == F32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        outs.append(out)
        # the CSR: counts per slot, contributors of each slot in increasing index order
        counts = torch.zeros(B, n_out, dtype=torch.int64).scatter_add_(1, slot, torch.ones_like(slot))
        assert torch.equal(ptr[:, 1:].long() - ptr[:, :-1].long(), counts) and bool((ptr[:, 0] == 0).all())
        for b in range(B):
            for o in range(n_out):
                members = order[b, ptr[b, o]:ptr[b, o + 1]].long()
                assert torch.equal(members, (slot[b] == o).nonzero().flatten())
    for o in outs[1:]:  # the 16-byte path computes the same numbers
        assert torch.equal(o, outs[0])


def test_emulate_merge_single_contributor_is_exact():
    """A slot with one real token is that token, bit for bit (weight s / s = 1)."""
    x = torch.randn(2, 50, 33)
    sizes = torch.rand(2, 50) * 7 + 0.1
    slot = torch.arange(50).expand(2, 50).contiguous()
    out, out_s, _, _, _ = emulate_merge(x, sizes, slot, 50)
    assert torch.equal(out, x) and torch.equal(out_s, sizes)


def test_emulate_merge_padding_only_and_empty_slots():
    B, N, D, n_out = 1, 6, 5, 4
    x = torch.randn(B, N, D)
    sizes = torch.tensor([[0.0, 0.0, 2.0, 0.0, 1.0, 3.0]])
    slot = torch.tensor([[0, 0, 1, 1, 1, 1]])  # slot 0: padding only (mean); 2, 3: empty (zeros)
    out, out_s, flags, ptr, _ = emulate_merge(x, sizes, slot, n_out)
    ref, ref_s = merge_reference(x, sizes, slot, n_out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(out_s, ref_s) and bool((out[0, 2:] == 0).all())
    torch.testing.assert_close(out[0, 0], (x[0, 0] + x[0, 1]) / 2)
    assert ptr.tolist() == [[0, 2, 6, 6, 6]]


def test_emulate_merge_flags_and_invalid_slots_skipped():
    B, N, D, n_out = 2, 70, 8, 10
    x = torch.randn(B, N, D)
    sizes = torch.ones(B, N)
    slot = torch.randint(0, n_out, (B, N))
    slot[0, 3], slot[1, 40], slot[1, 41] = -1, n_out, 2**40
    sizes[1, 7] = float("nan")
    out, _, flags, ptr, _ = emulate_merge(x, sizes, slot, n_out)
    assert flags == (3, 1)
    assert int(ptr[0, -1]) == N - 1 and int(ptr[1, -1]) == N - 2  # the invalid tokens are not in the CSR


def test_emulate_pipeline_matches_reference():
    """Match then merge, as a ToMe layer does (ViT-B/16 shapes: 197 tokens, CLS, r = 13)."""
    B, N, C, D, r = 3, 197, 64, 768, 13
    metric, sizes, roles = make_match_case(B, N, C)
    x = torch.randn(B, N, D)
    slot, dst, score, _ = emulate_match(metric, sizes, roles, r)
    ref = check_match(metric, sizes, roles, r, slot, dst, score)
    out, out_s, _, _, _ = emulate_merge(x, sizes, slot, N - r, 4)
    ref_out, ref_s = merge_reference(x, sizes, ref.slot, N - r)
    if torch.equal(slot, ref.slot):
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        assert torch.equal(out_s, ref_s)
    assert float(out_s.sum()) == B * N
