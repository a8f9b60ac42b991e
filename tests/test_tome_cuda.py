"""torch.ops.slimformer.tome_match / tome_merge on CUDA: bit for bit against the host replays, and
against the fp64 reference and the CPU ops.

Kernels: csrc/tome/tome_cuda.cu (prepare, best match, rank and slot kernels for the match; index and
gather kernels for the merge). The host replays (slimformer._C._test_tome_cuda_emulate_*, tested on the
CPU in test_tome_cuda_math.py) run the same math in the same order, so the GPU must reproduce them
exactly: slot and dst equal, score and merged rows equal bit for bit. Against the reference the
tolerances of test_tome_cuda_math.check_match apply (fp32 vs fp64: near ties). All tests are marked
``cuda`` and skip without a GPU.
"""
from __future__ import annotations

import pytest
import torch

from slimformer import _C
from slimformer.ops.tome import tome_match, tome_merge
from slimformer.tome.reference import ROLE_DESTINATION, ROLE_SOURCE, alternate_roles, match_reference, merge_reference
from test_tome_cuda_math import (  # tests/test_tome_cuda_math.py: replay wrappers and the reference check
    check_match,
    emulate_match,
    emulate_merge,
    make_match_case,
    max_r,
    random_slots,
    rel_err,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _C.has_cuda_kernels, reason="slimformer was built without CUDA kernels"),
]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ops = torch.ops.slimformer


def cuda(*ts):
    return [t.cuda() for t in ts]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.view(view), b.view(view))


def run_match(metric, sizes, roles, r):
    slot, dst, score = ops.tome_match(*cuda(metric, sizes, roles), r)
    torch.cuda.synchronize()
    return slot.cpu(), dst.cpu(), score.cpu()


def check_match_cuda(metric, sizes, roles, r, cpu_op=True):
    slot, dst, score = run_match(metric, sizes, roles, r)
    e_slot, e_dst, e_score, flags = emulate_match(metric, sizes, roles, r)
    assert flags[0] == 0
    assert torch.equal(dst, e_dst), (dst != e_dst).nonzero()[:5]
    assert same_bits(score, e_score)
    assert torch.equal(slot, e_slot)
    check_match(metric, sizes, roles, r, slot, dst, score)
    if cpu_op:  # the CPU op: the same rules (its fp32 sums run in another order: near ties may differ)
        c_slot, c_dst, c_score = ops.tome_match(metric, sizes, roles, r)
        check_match(metric, sizes, roles, r, c_slot, c_dst, c_score)
        torch.testing.assert_close(c_score, score, rtol=0, atol=2e-5)
    return slot, dst, score


MATCH_SHAPES = [(1, 1, 1), (2, 2, 7), (2, 3, 64), (3, 17, 7), (2, 130, 128), (4, 197, 64), (2, 577, 64),
                (1, 577, 1), (1, 1025, 96)]


@pytest.mark.parametrize("B,N,C", MATCH_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_match_vs_replay_reference_and_cpu(B, N, C, dtype):
    metric, sizes, roles = make_match_case(B, N, C, dtype)
    rmax = max_r(roles)
    for r in sorted({0, 1, rmax // 2, rmax} - ({1} if rmax < 1 else set())):
        check_match_cuda(metric, sizes, roles, r)


@pytest.mark.parametrize("B,N,C", [(2, 17, 7), (3, 130, 64), (2, 577, 128)], ids=str)
@pytest.mark.parametrize("case", ["padding", "nan", "random_roles", "no_cls", "ties"])
def test_match_special_rows(B, N, C, case):
    kw = dict(padding=dict(padding=True), nan=dict(nan_row=True), random_roles=dict(roles="random"),
              no_cls=dict(cls=False, padding=True), ties=dict(dup_dst=True, dup_src=True))[case]
    metric, sizes, roles = make_match_case(B, N, C, F16 if case == "ties" else F32, **kw)
    rmax = max_r(roles)
    for r in sorted({0, 1, rmax // 3, rmax}):
        check_match_cuda(metric, sizes, roles, r)


@pytest.mark.parametrize("N,C,n_dst", [(2500, 3, 90), (3000, 64, 1500)])
def test_match_long_rows(N, C, n_dst):
    B = 2
    metric = torch.randn(B, N, C)
    roles = torch.full((B, N), ROLE_SOURCE, dtype=torch.int8)
    roles[:, torch.randperm(N)[:n_dst]] = ROLE_DESTINATION
    sizes = torch.ones(B, N)
    sizes[1, -300:] = 0.0
    rmax = max_r(roles)
    for r in (7, rmax):
        check_match_cuda(metric, sizes, roles, r, cpu_op=False)


def test_match_8192_tokens_vs_reference():
    """The largest ToMe-style row the issue names (fp16, alternate roles, CLS): reference only."""
    B, N, C, r = 1, 8192, 64, 2048
    metric = torch.randn(B, N, C).half()
    sizes = torch.ones(B, N)
    roles = alternate_roles(B, N, torch.arange(N) == 0)
    slot, dst, score = run_match(metric, sizes, roles, r)
    check_match(metric, sizes, roles, r, slot, dst, score)


def test_match_deterministic_and_noncontiguous():
    B, N, C = 3, 197, 64
    base = torch.randn(B, C, N)  # metric seen as [B, N, C] through a transpose
    metric = base.transpose(1, 2)
    roles = alternate_roles(B, N, torch.arange(N) == 0)
    sizes = torch.randint(1, 5, (B, N)).float()
    mc, sc, rc = cuda(metric, sizes, roles)
    first = ops.tome_match(mc, sc, rc, 13)
    for _ in range(3):
        again = ops.tome_match(mc, sc, rc, 13)
        assert all(same_bits(a, b) if a.is_floating_point() else torch.equal(a, b) for a, b in zip(first, again))
    e = emulate_match(metric.contiguous(), sizes, roles, 13)
    assert torch.equal(first[0].cpu(), e[0]) and torch.equal(first[1].cpu(), e[1]) and same_bits(first[2], e[2])
    wrapped = tome_match(mc, sc, rc, 13)
    assert torch.equal(wrapped.slot, first[0])


def test_match_errors():
    metric, sizes, roles = make_match_case(2, 17, 8)
    mc, sc, rc = cuda(metric, sizes, roles)
    with pytest.raises(ValueError, match="source tokens"):
        ops.tome_match(mc, sc, rc, 9)  # 8 sources per row (CLS kept)
    bad = rc.clone()
    bad[1, 3] = 5
    with pytest.raises(ValueError, match="roles"):
        ops.tome_match(mc, sc, bad, 1)
    neg = sc.clone()
    neg[0, 2] = -1.0
    with pytest.raises(ValueError, match="sizes"):
        ops.tome_match(mc, neg, rc, 1)
    no_dst = rc.clone()
    no_dst[1][no_dst[1] == ROLE_DESTINATION] = ROLE_SOURCE
    with pytest.raises(ValueError, match="destination"):
        ops.tome_match(mc, sc, no_dst, 1)
    ops.tome_match(mc, sc, no_dst, 0)  # r = 0 needs no destination
    with pytest.raises(ValueError, match="float32"):
        ops.tome_match(mc.double(), sc, rc, 1)
    with pytest.raises(ValueError, match="roles"):
        ops.tome_match(mc, sc, rc.long(), 1)
    with pytest.raises(ValueError, match="sizes"):
        ops.tome_match(mc, sc[:, :5], rc, 1)
    with pytest.raises(ValueError):
        ops.tome_match(mc, sizes, rc, 1)  # sizes on the CPU
    with pytest.raises(ValueError, match="channel"):
        ops.tome_match(mc[:, :, :0], sc, rc, 1)
    s, d, sc0 = ops.tome_match(mc[:0], sc[:0], rc[:0], 3)
    assert s.shape == (0, 17)


# ---- merge ----
MERGE_CASES = [(1, 1, 1, 1, "random"), (2, 3, 2, 7, "random"), (3, 17, 13, 64, "tome"), (2, 33, 40, 100, "random"),
               (4, 197, 184, 768, "tome"), (1, 577, 500, 64, "tome"), (2, 130, 1, 8, "one"), (1, 9, 3, 1000, "random"),
               (2, 4096, 3000, 96, "random")]


def check_merge_cuda(x, sizes, slot, n_out, misaligned=False):
    xc, sc, slc = cuda(x, sizes, slot)
    if misaligned:  # contiguous, but one element past a 16-byte boundary: the scalar path
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
        xc = flat[1:].view(x.shape)
        xc.copy_(x.cuda())
    out, out_s = ops.tome_merge(xc, sc, slc, n_out)
    torch.cuda.synchronize()
    D = x.shape[-1]
    vec = 16 // x.element_size()
    vec = vec if (not misaligned and D % vec == 0) else 1
    e_out, e_s, flags, _, _ = emulate_merge(x, sizes, slot, n_out, vec)
    assert flags == (0, 0)
    assert same_bits(out, e_out) and same_bits(out_s, e_s)
    ref, ref_s = merge_reference(x, sizes, slot, n_out)
    assert rel_err(out.cpu(), ref) <= {F32: 1e-6, F16: 1e-3, BF16: 8e-3}[x.dtype]
    torch.testing.assert_close(out_s.cpu(), ref_s, rtol=1e-6, atol=0)
    c_out, c_s = ops.tome_merge(x, sizes, slot, n_out)
    assert rel_err(out.cpu(), c_out.float()) <= {F32: 1e-6, F16: 2e-3, BF16: 1.6e-2}[x.dtype]
    torch.testing.assert_close(out_s.cpu(), c_s, rtol=1e-6, atol=0)
    return out, out_s


@pytest.mark.parametrize("B,N,n_out,D,kind", MERGE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_merge_vs_replay_reference_and_cpu(B, N, n_out, D, kind, dtype):
    slot = random_slots(B, N, n_out, kind)
    x = torch.randn(B, N, D).to(dtype)
    sizes = torch.randint(1, 5, (B, N)).float()
    if N > 3:
        sizes[0, -2:] = 0.0
    check_merge_cuda(x, sizes, slot, n_out)
    if D % (16 // x.element_size()) == 0:
        check_merge_cuda(x, sizes, slot, n_out, misaligned=True)


def test_merge_padding_only_empty_slots_and_errors():
    x = torch.randn(1, 6, 5)
    sizes = torch.tensor([[0.0, 0.0, 2.0, 0.0, 1.0, 3.0]])
    slot = torch.tensor([[0, 0, 1, 1, 1, 1]])
    out, out_s = check_merge_cuda(x, sizes, slot, 4)
    assert bool((out[0, 2:] == 0).all()) and out_s.tolist() == [[0.0, 6.0, 0.0, 0.0]]
    xc, sc, slc = cuda(x, sizes, slot)
    with pytest.raises(ValueError, match="slot"):
        ops.tome_merge(xc, sc, slc, 1)
    neg = slc.clone()
    neg[0, 0] = -1
    with pytest.raises(ValueError, match="slot"):
        ops.tome_merge(xc, sc, neg, 4)
    with pytest.raises(ValueError, match="sizes"):
        ops.tome_merge(xc, sc * float("nan"), slc, 4)
    with pytest.raises(ValueError, match="slot"):
        ops.tome_merge(xc, sc, slc.int(), 4)
    with pytest.raises(ValueError, match="n_out"):
        ops.tome_merge(xc, sc, slc, 0)
    out, out_s = ops.tome_merge(xc[:, :0], sc[:, :0], slc[:, :0], 3)
    assert out.shape == (1, 3, 5) and bool((out == 0).all()) and bool((out_s == 0).all())
    out, out_s = ops.tome_merge(xc[:, :, :0], sc, slc, 4)  # D = 0: sizes only
    assert out.shape == (1, 4, 0) and out_s.tolist() == [[0.0, 6.0, 0.0, 0.0]]


def test_merge_autograd_matches_cpu():
    B, N, D, r = 2, 33, 24, 6
    metric, sizes, roles = make_match_case(B, N, 16)
    slot = match_reference(metric, sizes, roles, r).slot
    x = torch.randn(B, N, D, requires_grad=True)
    xc = x.detach().cuda().requires_grad_(True)
    out_cpu, _ = tome_merge(x, sizes, slot, N - r)
    out_cuda, _ = tome_merge(xc, *cuda(sizes, slot), N - r)
    g = torch.randn_like(out_cpu)
    out_cpu.backward(g)
    out_cuda.backward(g.cuda())
    torch.testing.assert_close(xc.grad.cpu(), x.grad, rtol=1e-6, atol=1e-6)


def test_opcheck():
    metric, sizes, roles = make_match_case(2, 33, 16)
    mc, sc, rc = cuda(metric, sizes, roles)
    torch.library.opcheck(ops.tome_match.default, (mc, sc, rc, 5))
    slot = ops.tome_match(mc, sc, rc, 5)[0]
    x = torch.randn(2, 33, 40, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.tome_merge.default, (x, sc, slot, 28))


def test_cuda_graph_capture_skips_the_host_checks():
    """Under stream capture the adapters cannot copy their counters to the host: no checks, same results."""
    B, N, C, D, r = 2, 197, 64, 128, 13
    metric, sizes, roles = make_match_case(B, N, C)
    x = torch.randn(B, N, D)
    mc, sc, rc, xc = cuda(metric, sizes, roles, x)
    eager_slot = ops.tome_match(mc, sc, rc, r)[0]
    eager_out = ops.tome_merge(xc, sc, eager_slot, N - r)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture
        ops.tome_merge(xc, sc, ops.tome_match(mc, sc, rc, r)[0], N - r)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        slot = ops.tome_match(mc, sc, rc, r)[0]
        out, out_s = ops.tome_merge(xc, sc, slot, N - r)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(slot, eager_slot)
    assert same_bits(out, eager_out[0]) and same_bits(out_s, eager_out[1])
