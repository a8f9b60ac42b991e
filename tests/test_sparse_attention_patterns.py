"""Sparse attention patterns: the block-CSR plans the kernels walk encode exactly each pattern's
dense rule, and bad patterns are refused with a clear message."""
from __future__ import annotations

import pytest
import torch

from slimformer.attention import BigBird, BlockLayout, SlidingWindow
from slimformer.attention.reference import plan_dense_mask

HEADS = 3
PATTERNS = {
    "window5": lambda: SlidingWindow(5),
    "window70": lambda: SlidingWindow(70),
    "window1": lambda: SlidingWindow(1),
    "window_globals": lambda: SlidingWindow(33, global_tokens=(0, 64, 100)),
    "window_forced_bidir": lambda: SlidingWindow(300, causal=False),
    "bigbird16": lambda: BigBird(block_size=16, random_blocks=2, seed=3),
    "bigbird32_noglobal": lambda: BigBird(block_size=32, window_blocks=1, global_blocks=0, random_blocks=1),
    "layout_shared": lambda: BlockLayout(16, torch.rand(1, 9, 9) > 0.5),
    "layout_per_head": lambda: BlockLayout(16, torch.rand(HEADS, 9, 9) > 0.6),
}
PROBLEMS = [(97, 97), (130, 130), (128, 128), (1, 97), (5, 130), (17, 64)]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("q_len,kv_len", PROBLEMS, ids=[f"{a}x{b}" for a, b in PROBLEMS])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_plan_encodes_the_dense_rule(name, q_len, kv_len, causal):
    pattern = PATTERNS[name]()
    plan = pattern.plan(q_len, kv_len, causal=causal, num_heads=HEADS)
    dense = pattern.dense_mask(q_len, kv_len, causal=causal, num_heads=HEADS)
    assert dense.dtype == torch.bool and dense.shape[1:] == (q_len, kv_len)
    assert torch.equal(plan_dense_mask(plan), dense)
    # CSR well formed: sorted columns per row, offsets consistent, the transpose has the same entries
    assert plan.row_ptr.shape == (plan.layout_heads, plan.num_q_blocks + 1)
    assert plan.col_ptr.shape == (plan.layout_heads, plan.num_k_blocks + 1)
    assert int(plan.row_ptr[-1, -1]) == plan.nnz == int(plan.col_ptr[-1, -1]) == plan.row_idx.numel()
    for h in range(plan.layout_heads):
        for r in range(plan.num_q_blocks):
            cols = plan.col_idx[plan.row_ptr[h, r]: plan.row_ptr[h, r + 1]]
            assert torch.all(cols[1:] > cols[:-1])


def test_window_follows_the_model_unless_forced():
    follow, forced = SlidingWindow(4), SlidingWindow(4, causal=False)
    assert torch.equal(follow.dense_mask(10, causal=True)[0], torch.ones(10, 10).tril().bool() & ~torch.ones(10, 10).tril(-4).bool())
    assert torch.equal(forced.dense_mask(10, causal=True), forced.dense_mask(10))
    assert SlidingWindow(4, causal=True).dense_mask(10).tril().sum() == SlidingWindow(4, causal=True).dense_mask(10).sum()


def test_window_counts_keys_per_side_including_the_query():
    mask = SlidingWindow(3).dense_mask(20)[0]
    assert mask[10].sum() == 5 and mask[0].sum() == 3           # |i - j| < 3
    assert SlidingWindow(3).dense_mask(20, causal=True)[0, 10].sum() == 3


def test_global_tokens_attend_and_are_attended_by_all():
    mask = SlidingWindow(2, global_tokens=(7,)).dense_mask(40)[0]
    assert mask[7].all() and mask[:, 7].all()
    assert mask[20].sum() == 3 + 1


def test_decode_plan_visits_only_the_window():
    """One new token over a 32k cache: O(window) tiles, not O(n)."""
    plan = SlidingWindow(256).plan(1, 32768, causal=True)
    assert plan.q_offset == 32767 and plan.num_q_blocks == 1
    assert plan.nnz <= 256 // 64 + 2


def test_window_plan_is_linear_in_n():
    small, big = SlidingWindow(512).plan(4096), SlidingWindow(512).plan(32768)
    assert big.nnz <= 8.5 * small.nnz          # 8x the length: ~8x the tiles (fewer clipped edge rows)


def test_bigbird_layout_shape_and_rules():
    bb = BigBird(block_size=16, window_blocks=3, global_blocks=1, random_blocks=2, seed=7)
    lay = bb.layout(10, num_heads=4)
    assert lay.shape == (4, 10, 10)
    assert lay[:, 0].all() and lay[:, -1].all() and lay[:, :, 0].all() and lay[:, :, -1].all()
    for r in range(1, 9):
        band = {r - 1, r, r + 1} | {0, 9}
        extra = set(lay[0, r].nonzero().flatten().tolist()) - band
        assert len(extra) == 2
    assert torch.equal(lay, bb.layout(10, num_heads=4))                      # seeded: reproducible
    assert not torch.equal(lay, BigBird(block_size=16, random_blocks=2, seed=8).layout(10, num_heads=4))
    assert bb.dense_mask(160, num_heads=4).shape == (4, 160, 160)
    assert BigBird(block_size=16, random_blocks=0).dense_mask(160, num_heads=4).shape[0] == 1


def test_causal_bigbird_draws_random_blocks_from_the_past():
    lay = BigBird(block_size=16, global_blocks=0, random_blocks=2).layout(12, num_heads=2, causal=True)
    assert not lay.triu(2).any()


def test_plans_are_cached_and_move_devices():
    pattern = SlidingWindow(64)
    assert pattern.plan(300) is pattern.plan(300)
    assert pattern.plan(300).to("cpu") is pattern.plan(300)


@pytest.mark.parametrize("make,match", [
    (lambda: SlidingWindow(-1), "window must be an int >= 1"),
    (lambda: SlidingWindow(0), "window must be an int >= 1"),
    (lambda: SlidingWindow(2.5), "window must be an int"),
    (lambda: SlidingWindow(4, causal="yes"), "causal must be"),
    (lambda: SlidingWindow(4, global_tokens=(-1,)), "non-negative"),
    (lambda: BigBird(block_size=24), "multiple of 16"),
    (lambda: BigBird(block_size=0), "multiple of 16"),
    (lambda: BigBird(window_blocks=2), "odd"),
    (lambda: BigBird(random_blocks=-1), "random_blocks"),
    (lambda: BlockLayout(16, torch.ones(4, 4)), "bool"),
    (lambda: BlockLayout(16, torch.ones(4, dtype=torch.bool)), "layout must be"),
    (lambda: BlockLayout(20, torch.ones(4, 4, dtype=torch.bool)), "multiple of 16"),
])
def test_bad_patterns_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_patterns_are_immutable_and_own_their_layout():
    """Plans are cached per pattern: changing a pattern after use would silently keep old plans."""
    window = SlidingWindow(8)
    window.plan(64)
    with pytest.raises(AttributeError, match="immutable"):
        window.window = 100
    lay = torch.ones(1, 4, 4, dtype=torch.bool)
    pattern = BlockLayout(16, lay)
    before = pattern.plan(64).nnz
    lay[0, :, 1:] = False                      # the caller's tensor, not the pattern's copy
    assert pattern.plan(64).nnz == before == 16
    assert pattern.dense_mask(64).all()


def test_plans_record_head_dependence():
    assert BigBird(block_size=16, random_blocks=2).plan(160, num_heads=4).head_dependent
    assert not BigBird(block_size=16, random_blocks=0).plan(160, num_heads=4).head_dependent
    assert not SlidingWindow(8).plan(64).head_dependent
    assert BlockLayout(16, torch.ones(3, 4, 4, dtype=torch.bool)).plan(64, num_heads=3).num_heads == 3


def test_bad_problems_raise():
    with pytest.raises(ValueError, match="covers"):
        BlockLayout(16, torch.ones(2, 2, dtype=torch.bool)).plan(33)
    with pytest.raises(ValueError, match="heads"):
        BlockLayout(16, torch.ones(2, 4, 4, dtype=torch.bool)).plan(64, num_heads=3)
    with pytest.raises(ValueError, match="must lie inside"):
        SlidingWindow(4).plan(10, 5)
    with pytest.raises(ValueError, match=">= 1"):
        SlidingWindow(4).plan(0)
