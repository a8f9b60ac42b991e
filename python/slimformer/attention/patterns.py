"""Sparse attention patterns: which keys each query may attend.

A pattern answers one question, ``allowed(h, p, j)``: may the query at absolute position ``p``
(query row ``i`` sits at ``p = q_offset + i``; ``q_offset = kv_len - q_len`` when decoding with a KV
cache) attend the key at position ``j`` in head ``h``? The full rule, shared by every kernel and
by :meth:`Pattern.dense_mask`::

    allowed(h, p, j) = (not causal or j <= p)
                       and ( -left <= j - p <= right            (sliding window, if any)
                             or global[p] or global[j]          (global tokens, if any)
                             or layout[h, p // bs, j // bs] )   (block layout, if any)

Padding (a key mask per batch row) is applied on top by the attention call. A query with no
allowed key outputs zeros. Positions are key slots: in a left-padded batch, position 0 of a row may
be padding, so ``global_tokens=(0,)`` names the first slot, not the first real token.

Kernels do not evaluate this rule on all n x n pairs: :meth:`Pattern.plan` turns it into a
:class:`BlockPlan`, a block-CSR list of the key tiles each query tile must visit, each flagged
*full* (every pair inside is allowed by the OR-part; only causal and padding remain to check)
or *partial* (evaluate the window / global rule per element). Layout blocks are always full.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

#: Tile edge (queries and keys) of the plans made for :class:`SlidingWindow`.
WINDOW_TILE = 64


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """The block-CSR form of a pattern for one (q_len, kv_len, q_offset, causal) problem.

    Tiles are ``block_size`` positions in absolute position space: query tile ``t`` covers
    positions ``[t*bs, (t+1)*bs)`` intersected with ``[q_offset, q_offset + q_len)``, so the first
    one is ``first_q_block = q_offset // bs`` (``num_q_blocks`` of them); key tile ``c`` covers
    ``[c*bs, (c+1)*bs) ∩ [0, kv_len)``.

    Row CSR (forward, dQ), per layout head ``h`` (``layout_heads`` is 1 or the query head count)::

        row_ptr  int32 [layout_heads, num_q_blocks + 1]   absolute offsets into col_idx
        col_idx  int32 [nnz]                               key tile indices, ascending per row
        col_full uint8 [nnz]                               1 = full tile, 0 = partial

    Column CSR (dK, dV), the transpose::

        col_ptr  int32 [layout_heads, num_k_blocks + 1]
        row_idx  int32 [nnz]                               query tile index - first_q_block
        row_full uint8 [nnz]

    Element rule for partial tiles: ``window_left`` / ``window_right`` (-1: no window) and
    ``global_mask`` (uint8 [kv_len] over absolute positions, or None).
    """

    block_size: int
    q_len: int
    kv_len: int
    q_offset: int
    causal: bool
    layout_heads: int
    first_q_block: int
    num_q_blocks: int
    num_k_blocks: int
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    col_full: torch.Tensor
    col_ptr: torch.Tensor
    row_idx: torch.Tensor
    row_full: torch.Tensor
    window_left: int = -1
    window_right: int = -1
    global_mask: torch.Tensor | None = None
    #: query heads the plan was made for, and whether the pattern differs per head (then the plan
    #: only fits attention with exactly ``num_heads`` query heads)
    num_heads: int = 1
    head_dependent: bool = False
    _moved: dict = field(default_factory=dict, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.col_idx.numel())

    def density(self) -> float:
        """Fraction of the (layout_heads x q tiles x k tiles) grid that is visited."""
        return self.nnz / max(1, self.layout_heads * self.num_q_blocks * self.num_k_blocks)

    def to(self, device: torch.device | str) -> "BlockPlan":
        """The same plan with its tensors on ``device`` (cached per device)."""
        device = torch.device(device)
        if device == self.col_idx.device:
            return self
        key = str(device)
        if key not in self._moved and torch.is_inference_mode_enabled():
            with torch.inference_mode(False):  # cached: keep it usable outside inference mode
                return self.to(device)
        if key not in self._moved:
            moved = {name: (None if getattr(self, name) is None else getattr(self, name).to(device))
                     for name in ("row_ptr", "col_idx", "col_full", "col_ptr", "row_idx", "row_full", "global_mask")}
            self._moved[key] = BlockPlan(
                self.block_size, self.q_len, self.kv_len, self.q_offset, self.causal, self.layout_heads,
                self.first_q_block, self.num_q_blocks, self.num_k_blocks, window_left=self.window_left,
                window_right=self.window_right, num_heads=self.num_heads, head_dependent=self.head_dependent,
                **moved)
        return self._moved[key]


def _check_problem(q_len: int, kv_len: int | None, q_offset: int | None) -> tuple[int, int, int]:
    kv_len = q_len if kv_len is None else int(kv_len)
    q_offset = kv_len - q_len if q_offset is None else int(q_offset)
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"q_len and kv_len must be >= 1, got {q_len} and {kv_len}")
    if q_offset < 0 or q_offset + q_len > kv_len:
        raise ValueError(f"queries at positions [{q_offset}, {q_offset + q_len}) must lie inside the "
                         f"{kv_len} key positions (q_offset = kv_len - q_len when decoding)")
    return int(q_len), kv_len, q_offset


def _from_tile_grid(grid: torch.Tensor, full: torch.Tensor, bs: int, q_len: int, kv_len: int, q_offset: int,
                    causal: bool, first_q: int, window: tuple[int, int], global_mask: torch.Tensor | None) -> BlockPlan:
    """BlockPlan from a visited-tile grid bool [H, QB, KB] (QB rows start at tile ``first_q``)."""
    heads, qb, kb = grid.shape
    if causal:  # drop tiles whose first key lies after the tile's last query
        q_last = torch.clamp((torch.arange(qb) + first_q + 1) * bs - 1, max=q_offset + q_len - 1)
        grid = grid & (torch.arange(kb)[None, :] * bs <= q_last[:, None])[None]
    full = full & grid
    h_idx, r_idx, c_idx = grid.nonzero(as_tuple=True)             # row-major: sorted by (h, row, col)
    counts = grid.sum(2).reshape(-1)
    row_ptr = torch.zeros(heads * qb + 1, dtype=torch.int64)
    row_ptr[1:] = counts.cumsum(0)
    gt = grid.transpose(1, 2)
    ht, ct, rt = gt.nonzero(as_tuple=True)                         # sorted by (h, col, row)
    col_ptr = torch.zeros(heads * kb + 1, dtype=torch.int64)
    col_ptr[1:] = gt.sum(2).reshape(-1).cumsum(0)
    # row_ptr is per head [H, QB+1] with absolute offsets: head h's row r spans row_ptr[h, r]..row_ptr[h, r+1].
    rp = torch.stack([row_ptr[h * qb: h * qb + qb + 1] for h in range(heads)])
    cp = torch.stack([col_ptr[h * kb: h * kb + kb + 1] for h in range(heads)])
    return BlockPlan(
        block_size=bs, q_len=q_len, kv_len=kv_len, q_offset=q_offset, causal=causal, layout_heads=heads,
        first_q_block=first_q, num_q_blocks=qb, num_k_blocks=kb,
        row_ptr=rp.to(torch.int32).contiguous(), col_idx=c_idx.to(torch.int32), col_full=full[h_idx, r_idx, c_idx].to(torch.uint8),
        col_ptr=cp.to(torch.int32).contiguous(), row_idx=rt.to(torch.int32), row_full=full[ht, rt, ct].to(torch.uint8),
        window_left=window[0], window_right=window[1],
        global_mask=None if global_mask is None else global_mask.to(torch.uint8).contiguous())


class Pattern:
    """Base of the sparse attention patterns. Subclasses define :meth:`_dense_rule` and
    :meth:`_make_plan` and call :meth:`_freeze` at the end of ``__init__``: a pattern is immutable
    once made, because its block plans are cached (make a new one and call ``sparsify`` again)."""

    #: causal flag fixed by the pattern, or None to follow the model (the ``causal`` argument).
    causal: bool | None = None

    def _freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"{type(self).__name__} is immutable (its block plans are cached): make a new "
                                 f"pattern instead of setting {name!r}, and pass it to sparsify again")
        object.__setattr__(self, name, value)

    def head_dependent(self) -> bool:
        """Whether heads get different layouts (a plan then fits only its ``num_heads``)."""
        return False

    def _resolve_causal(self, causal: bool) -> bool:
        return bool(causal) if self.causal is None else bool(self.causal)

    def plan(self, q_len: int, kv_len: int | None = None, *, causal: bool = False, q_offset: int | None = None,
             num_heads: int = 1, device: torch.device | str = "cpu") -> BlockPlan:
        """The :class:`BlockPlan` for ``q_len`` queries at positions ``q_offset ..`` over ``kv_len``
        keys (defaults: self-attention, or the last ``q_len`` positions when ``kv_len > q_len``).
        ``num_heads`` is the query head count (patterns with per-head layouts check it). Cached."""
        q_len, kv_len, q_offset = _check_problem(q_len, kv_len, q_offset)
        key = (q_len, kv_len, q_offset, self._resolve_causal(causal), int(num_heads))
        cache = self.__dict__.setdefault("_plans", {})
        # Plans are cached across calls: never make them inference tensors (a plan first made under
        # torch.inference_mode would otherwise break a later forward that autograd records).
        with torch.inference_mode(False):
            if key not in cache:
                if len(cache) > 64:
                    cache.clear()
                cache[key] = dataclasses.replace(self._make_plan(*key), num_heads=int(num_heads),
                                                 head_dependent=self.head_dependent())
            return cache[key].to(device)

    def dense_mask(self, q_len: int, kv_len: int | None = None, *, causal: bool = False,
                   q_offset: int | None = None, num_heads: int = 1) -> torch.Tensor:
        """The equivalent dense rule: bool [layout_heads (1 or num_heads), q_len, kv_len], True =
        allowed (padding not included). O(n^2): for tests and for checking a pattern."""
        q_len, kv_len, q_offset = _check_problem(q_len, kv_len, q_offset)
        causal = self._resolve_causal(causal)
        p = torch.arange(q_offset, q_offset + q_len)[:, None]
        j = torch.arange(kv_len)[None, :]
        allowed = self._dense_rule(p, j, kv_len, int(num_heads), causal)
        if causal:
            allowed = allowed & (j <= p)
        return allowed if allowed.dim() == 3 else allowed[None]

    # -- subclass hooks --
    def _dense_rule(self, p, j, kv_len, num_heads, causal):  # pragma: no cover - abstract
        raise NotImplementedError

    def _make_plan(self, q_len, kv_len, q_offset, causal, num_heads) -> BlockPlan:  # pragma: no cover
        raise NotImplementedError


def _check_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or block_size < 16 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16 (the kernels' tile granule), got {block_size!r}")
    return block_size


class SlidingWindow(Pattern):
    """Each query attends the ``window`` nearest keys on each allowed side, itself included
    (bidirectional: ``|j - p| < window``; causal: ``p - window < j <= p``), plus ``global_tokens``
    (absolute positions) that attend to and are attended by every token.

    ``causal``: None follows the model (decoder LMs causal, encoders bidirectional); True / False
    force it. Cost per query: O(window + number of global tokens)."""

    def __init__(self, window: int, causal: bool | None = None, global_tokens=()):
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window < 2**31:
            raise ValueError(f"window must be an int >= 1 (keys on each side, the query included) and below 2^31, "
                             f"got {window!r}")
        if causal not in (None, True, False):
            raise ValueError(f"causal must be None, True or False, got {causal!r}")
        tokens = tuple(int(t) for t in global_tokens)
        if any(t < 0 for t in tokens):
            raise ValueError(f"global_tokens must be non-negative positions, got {tokens}")
        self.window, self.causal, self.global_tokens = window, causal, tuple(sorted(set(tokens)))
        self._freeze()

    def __repr__(self) -> str:
        return f"SlidingWindow(window={self.window}, causal={self.causal}, global_tokens={self.global_tokens})"

    def _global_mask(self, kv_len: int) -> torch.Tensor | None:
        tokens = [t for t in self.global_tokens if t < kv_len]
        if not tokens:
            return None
        g = torch.zeros(kv_len, dtype=torch.bool)
        g[tokens] = True
        return g

    def _dense_rule(self, p, j, kv_len, num_heads, causal):
        allowed = (j - p).abs() < self.window
        g = self._global_mask(kv_len)
        if g is not None:
            allowed = allowed | g[p] | g[j]
        return allowed

    def _make_plan(self, q_len, kv_len, q_offset, causal, num_heads) -> BlockPlan:
        bs, w = WINDOW_TILE, self.window
        first_q = q_offset // bs
        last_q = (q_offset + q_len - 1) // bs
        kb = math.ceil(kv_len / bs)
        t = torch.arange(first_q, last_q + 1)
        p_lo = torch.clamp(t * bs, min=q_offset)                      # first / last query of each tile
        p_hi = torch.clamp((t + 1) * bs - 1, max=q_offset + q_len - 1)
        c = torch.arange(kb)
        j_lo, j_hi = c * bs, torch.clamp((c + 1) * bs - 1, max=kv_len - 1)
        # some pair within reach: j_hi >= p_lo - (w-1) and j_lo <= p_hi + (w-1)
        grid = (j_hi[None] >= p_lo[:, None] - (w - 1)) & (j_lo[None] <= p_hi[:, None] + (w - 1))
        # every pair within reach: |j - p| <= w-1 for the extreme corners
        full = (j_lo[None] >= p_hi[:, None] - (w - 1)) & (j_hi[None] <= p_lo[:, None] + (w - 1))
        g = self._global_mask(kv_len)
        if g is not None:
            gq = torch.stack([g[int(a): int(b) + 1].any() for a, b in zip(p_lo, p_hi)])    # tile has a global query
            gk_any = torch.stack([g[int(a): int(b) + 1].any() for a, b in zip(j_lo, j_hi)])
            gk_all = torch.stack([g[int(a): int(b) + 1].all() for a, b in zip(j_lo, j_hi)])
            gq_all = torch.stack([g[int(a): int(b) + 1].all() for a, b in zip(p_lo, p_hi)])
            grid = grid | gq[:, None] | gk_any[None]
            full = full | gq_all[:, None] | gk_all[None]
        return _from_tile_grid(grid[None], full[None], bs, q_len, kv_len, q_offset, causal, first_q,
                               (w - 1, w - 1), g)


class LayoutPattern(Pattern):
    """A pattern given by a block layout: query block ``a`` attends key block ``b`` in head ``h``
    when ``layout[h, a, b]`` (every pair in it: layout tiles are full). Subclasses define
    :meth:`_layout`; block boundaries are absolute positions (multiples of ``block_size``)."""

    block_size: int

    def _layout(self, q_len_abs: int, kv_len: int, num_heads: int, causal: bool) -> torch.Tensor:
        """bool [1 or num_heads, >= ceil(q_len_abs / bs), ceil(kv_len / bs)]."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _dense_rule(self, p, j, kv_len, num_heads, causal):
        lay = self._layout(int(p.max()) + 1, kv_len, num_heads, causal)
        return lay[:, p // self.block_size, j // self.block_size]

    def _make_plan(self, q_len, kv_len, q_offset, causal, num_heads) -> BlockPlan:
        bs = self.block_size
        lay = self._layout(q_offset + q_len, kv_len, num_heads, causal)
        first_q, last_q = q_offset // bs, (q_offset + q_len - 1) // bs
        grid = lay[:, first_q:last_q + 1]
        return _from_tile_grid(grid, grid.clone(), bs, q_len, kv_len, q_offset, causal, first_q, (-1, -1), None)


class BlockLayout(LayoutPattern):
    """A user's block layout: ``layout`` bool [heads or 1, q_blocks, k_blocks]; query block ``a``
    attends key block ``b`` when ``layout[h, a, b]``. Sequences must fit the layout
    (``ceil(len / block_size) <= blocks``); per-head layouts need as many heads as the model has
    *query* heads. ``causal`` as for :class:`SlidingWindow`. The layout is copied."""

    def __init__(self, block_size: int, layout: torch.Tensor, causal: bool | None = None):
        self.block_size = _check_block_size(block_size)
        if not isinstance(layout, torch.Tensor) or layout.dim() not in (2, 3):
            raise ValueError("layout must be a bool tensor [heads or 1, q_blocks, k_blocks]")
        layout = layout if layout.dim() == 3 else layout[None]
        if layout.dtype != torch.bool:
            raise ValueError(f"layout must be a bool tensor, got {layout.dtype}")
        self.layout = layout.detach().to("cpu", copy=True).contiguous()
        self.causal = causal
        self._freeze()

    def __repr__(self) -> str:
        return f"BlockLayout(block_size={self.block_size}, layout={tuple(self.layout.shape)}, causal={self.causal})"

    def head_dependent(self) -> bool:
        return self.layout.shape[0] > 1

    def _layout(self, q_len_abs: int, kv_len: int, num_heads: int, causal: bool) -> torch.Tensor:
        bs, lay = self.block_size, self.layout
        need_q, need_k = math.ceil(q_len_abs / bs), math.ceil(kv_len / bs)
        if lay.shape[1] < need_q or lay.shape[2] < need_k:
            raise ValueError(f"layout {tuple(lay.shape)} with block_size {bs} covers {lay.shape[1] * bs} query and "
                             f"{lay.shape[2] * bs} key positions; this call needs {q_len_abs} and {kv_len}")
        if lay.shape[0] not in (1, num_heads):
            raise ValueError(f"layout has {lay.shape[0]} heads; the model has {num_heads} query heads (use 1 or "
                             f"{num_heads})")
        return lay[:, :need_q, :need_k]


class BigBird(LayoutPattern):
    """BigBird block-sparse attention (ITC): blocks of ``block_size``; each query block attends
    ``window_blocks`` blocks centred on itself (odd), the first and the last ``global_blocks`` blocks
    (which also attend everything), and ``random_blocks`` other blocks drawn per head from
    ``seed`` (fixed per sequence length, as in the paper's inference). ``causal`` as for
    :class:`SlidingWindow`; causal random blocks are drawn among earlier blocks."""

    def __init__(self, block_size: int = 64, window_blocks: int = 3, global_blocks: int = 1, random_blocks: int = 3,
                 seed: int = 0, causal: bool | None = None):
        self.block_size = _check_block_size(block_size)
        for name, v in (("window_blocks", window_blocks), ("global_blocks", global_blocks),
                        ("random_blocks", random_blocks)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if window_blocks % 2 == 0:
            raise ValueError(f"window_blocks must be odd (centred on the query block), got {window_blocks}")
        self.window_blocks, self.global_blocks, self.random_blocks = window_blocks, global_blocks, random_blocks
        self.seed, self.causal = int(seed), causal
        self._freeze()

    def __repr__(self) -> str:
        return (f"BigBird(block_size={self.block_size}, window_blocks={self.window_blocks}, "
                f"global_blocks={self.global_blocks}, random_blocks={self.random_blocks}, seed={self.seed}, "
                f"causal={self.causal})")

    def layout(self, num_blocks: int, num_heads: int = 1, causal: bool = False) -> torch.Tensor:
        """bool [num_heads, num_blocks, num_blocks] block layout (random blocks differ per head)."""
        nb, half, g = num_blocks, self.window_blocks // 2, self.global_blocks
        a = torch.arange(nb)
        base = (a[:, None] - a[None]).abs() <= half
        is_global = (a < g) | (a >= nb - g)
        base = base | is_global[:, None] | is_global[None]
        lay = base[None].repeat(num_heads, 1, 1)
        if self.random_blocks:
            gen = torch.Generator().manual_seed(self.seed)
            for h in range(num_heads):
                for r in range(nb):
                    if is_global[r]:
                        continue
                    cand = (~base[r]).nonzero().flatten()
                    if causal:
                        cand = cand[cand < r]
                    if cand.numel():
                        pick = cand[torch.randperm(cand.numel(), generator=gen)[: self.random_blocks]]
                        lay[h, r, pick] = True
        return lay

    def head_dependent(self) -> bool:
        return self.random_blocks > 0

    def _layout(self, q_len_abs, kv_len, num_heads, causal):
        heads = num_heads if self.random_blocks else 1
        return self.layout(math.ceil(kv_len / self.block_size), heads, causal)
