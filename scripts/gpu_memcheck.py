"""Exercise every CUDA GPTQ kernel path once on small shapes, for compute-sanitizer (scripts/gpu_check.sh).

Paths: small-batch gemv with one split (direct stores) and with split-K (fp32 workspace + finish
kernel), row tiles 1/2/4/8 and two row tiles, every bits value, 128-bit and scalar (N % 4 != 0)
qweight loads, perm and bias, fp16/bf16/fp32 x; large-batch dequantize + cuBLAS; gptq_dequantize.
Each result is compared with the CPU op so that a wrong answer also fails the run. Run it with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation and an out-of-bounds
access cannot land silently inside torch's memory pool.

Binary (1-bit) ops: the gemv kernel with one split and with split-K (+ finish kernel), token tiles
1/2/4/8, N % 16 != 0 and K % 32 != 0 tails, the large-batch unpack + cuBLAS path, and the W1A1 pack
+ popcount kernels (several token tiles and row groups); compared with the fp64 references.

Sparse attention: the tensor-core forward (fp16, bf16), the SIMT forward (fp32) and the SIMT backward
kernels (delta, dQ, dK/dV) once each on small ragged shapes (97 keys, block 16, GQA, padding, decode),
compared with the CPU op. They stage K / V / Q through shared memory, so they run under ``--only gemv`` too.

Token merging: tome_match (prepare, best match, rank and slot kernels) on ViT-like rows with CLS, padded
rows, rows long enough for several prepare / rank chunks and source / destination tiles, r = 0; tome_merge
(index and gather kernels) on the 16-byte and the scalar (misaligned x, odd D) gather paths; every dtype.
Scores are compared with the fp64 reference, the merge with merge_reference on the kernel's own slots.
The match kernels stage tiles in shared memory, so they run under ``--only gemv`` too.

``--only sparse`` runs the sparse attention cases alone; ``--only tome`` the token merging cases alone. ``--only gemv`` limits the run to the shared-memory kernels (for racecheck / synccheck, which are slow).
"""
from __future__ import annotations

import argparse
import sys

import torch

import slimformer  # noqa: F401  (registers torch.ops.slimformer)
from slimformer.gptq import pack_cols, pack_rows

ops = torch.ops.slimformer


def make(K: int, N: int, bits: int, group_size: int, act_order: bool = False):
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    g_idx = (torch.arange(K) // gs).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(K)].contiguous()
    q = torch.randint(0, 1 << bits, (K, N))
    z = torch.randint(0, 1 << bits, (G, N))
    scales = ((torch.rand(G, N) + 0.5) / (1 << bits)).half()
    return pack_rows(q, bits), pack_cols(z, bits), scales, g_idx


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    got, want = got.double().cpu(), want.double()
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    status = "ok" if err <= tol else "MISMATCH"
    print(f"{status:8s} {name:48s} rel_err={err:.2e}")
    if err > tol:
        raise SystemExit(f"{name}: relative error {err:.3g} > {tol}")


def gemm_case(name, K, N, bits, gs, M, dtype=torch.float16, act_order=False, perm=False, bias=False):
    qw, qz, sc, gi = make(K, N, bits, gs, act_order)
    x = torch.randn(M, K).to(dtype)
    p = torch.randperm(K).to(torch.int32) if perm else None
    b = torch.randn(N).half() if bias else None
    want = ops.gptq_gemm(x.float(), qw, qz, sc, gi, p, b, bits, 1)
    cuda = [t.cuda() if t is not None else None for t in (x, qw, qz, sc, gi, p, b)]
    got = ops.gptq_gemm(*cuda, bits, 1)
    torch.cuda.synchronize()
    check(f"gemm {name} M={M} K={K} N={N} b{bits} {str(dtype)[6:]}", got, want,
          1e-4 if dtype == torch.float32 else 2e-2)


def binary_case(name, M, K, N, dtype=torch.float16, a1=False, bias=True):
    from slimformer.binary import pack_signs
    from slimformer.binary.reference import binary_linear_a1_reference, binary_linear_reference

    qw = pack_signs(torch.rand(N, K) < 0.5)
    alpha = torch.rand(N) + 0.25
    b = torch.randn(N) if bias else None
    x = torch.randn(M, K).to(dtype)
    cu = [t.cuda() if t is not None else None for t in (x, qw, alpha, b)]
    if a1:
        scale, shift = torch.tensor(0.5), torch.tensor(0.1)
        got = ops.binary_gemm_a1(*cu, scale.cuda(), shift.cuda(), K)
        want = binary_linear_a1_reference(x, qw, alpha, b, scale, shift, K)
    else:
        got = ops.binary_gemm(*cu, K)
        want = binary_linear_reference(x, qw, alpha, b, K)
    torch.cuda.synchronize()
    check(f"binary {'w1a1' if a1 else 'w1afp'} {name} M={M} K={K} N={N} {str(dtype)[6:]}", got, want,
          1e-5 if dtype == torch.float32 else 2e-2)


def binary_cases() -> None:
    binary_case("gemv one split", 1, 100, 17, torch.float32)
    binary_case("gemv split-k", 3, 4096 + 33, 20, torch.bfloat16)
    binary_case("gemv tile 8, two tiles", 13, 1000, 33)
    binary_case("unpack+cublas", 70, 100, 15, bias=False)
    binary_case("pack+popcount", 1, 31, 1, torch.float32, a1=True)
    binary_case("pack+popcount", 33, 1000, 100, a1=True)
    binary_case("pack+popcount groups", 70, 576, 130, torch.bfloat16, a1=True, bias=False)


def sparse_case(name, pattern, Sq, Sk, dtype, D=64, Hq=2, Hkv=1, causal=False, padding=False, backward=True):
    """One sparse attention call on CUDA (forward, and backward through autograd), compared with the CPU op."""
    from slimformer.ops.attention import sparse_attention

    plan = pattern.plan(Sq, Sk, causal=causal, num_heads=Hq)
    q, k, v = (torch.randn(2, h, s, D).to(dtype) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    km = None
    if padding:
        km = torch.ones(2, Sk, dtype=torch.bool)
        km[0, Sk - Sk // 3:] = False
    want = sparse_attention(q.float(), k.float(), v.float(), plan, key_mask=km)
    qc, kc, vc = (t.cuda().requires_grad_(backward) for t in (q, k, v))
    got = sparse_attention(qc, kc, vc, plan, key_mask=None if km is None else km.cuda())
    if backward:
        got.backward(torch.ones_like(got))
    torch.cuda.synchronize()
    check(f"sparse {name} Sq={Sq} Sk={Sk} D={D} {str(dtype)[6:]}", got.detach(), want,
          1e-4 if dtype == torch.float32 else 2e-2)


def sparse_cases() -> None:
    from slimformer.attention import BigBird, SlidingWindow

    # mma forward (fp16 / bf16), SIMT forward (fp32), SIMT backward (delta, dQ, dK/dV) for each; ragged
    # tails (97 keys), block 16 (1-warp CTAs), causal at an offset, GQA, padding, global tokens, decode.
    sparse_case("window+global mma", SlidingWindow(20, global_tokens=(0, 50)), 97, 97, torch.float16, padding=True)
    sparse_case("bigbird16 causal mma", BigBird(16, random_blocks=1, causal=True), 40, 97, torch.bfloat16, D=80,
                Hq=4, Hkv=2)
    sparse_case("window simt", SlidingWindow(33, causal=True), 97, 97, torch.float32, D=128)
    sparse_case("decode", SlidingWindow(64, causal=True), 1, 130, torch.float16, D=32, backward=False)


def tome_case(name, B, N, C, D, r, dtype, padding=False, misaligned=False):
    """tome_match then tome_merge on CUDA, against the fp64 references."""
    from slimformer.tome.reference import ROLE_SOURCE, alternate_roles, match_reference, merge_reference

    metric = torch.randn(B, N, C).to(dtype)
    roles = alternate_roles(B, N, torch.arange(N) == 0)
    sizes = torch.randint(1, 4, (B, N)).float()
    if padding:
        sizes[0, N - N // 3:] = 0.0
    slot, dst, score = ops.tome_match(metric.cuda(), sizes.cuda(), roles.cuda(), r)
    x = torch.randn(B, N, D).to(dtype)
    if misaligned:  # contiguous, one element past a 16-byte boundary: the scalar gather
        xc = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")[1:].view(B, N, D)
        xc.copy_(x.cuda())
    else:
        xc = x.cuda()
    out, out_sizes = ops.tome_merge(xc, sizes.cuda(), slot, N - r)
    torch.cuda.synchronize()
    ref = match_reference(metric, sizes, roles, r)
    src = roles == ROLE_SOURCE
    tag = f"B={B} N={N} C={C} r={r} {str(dtype)[6:]}"
    check(f"tome match {name} {tag}", score.cpu()[src], ref.score[src], 1e-5)
    assert bool((dst.cpu()[~src] == -1).all()) and int(slot.max()) == N - r - 1, "tome match: bad dst / slot"
    want, want_sizes = merge_reference(x, sizes, slot.cpu(), N - r)
    check(f"tome merge {name} D={D}", out, want, 1e-6 if dtype == torch.float32 else 8e-3)
    check(f"tome merge sizes {name}", out_sizes, want_sizes, 1e-6)


def tome_cases() -> None:
    tome_case("vit", 3, 197, 64, 96, 13, torch.float16)
    tome_case("padded misaligned", 2, 130, 7, 33, 20, torch.bfloat16, padding=True, misaligned=True)
    tome_case("long row", 1, 2100, 40, 64, 700, torch.float32)  # 3 rank chunks, 5 prepare chunks, 17 tiles
    tome_case("r=0", 2, 17, 5, 8, 0, torch.float32, misaligned=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("all", "gemv", "sparse", "tome"), default="all")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: nothing to check")
        return 0
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {torch.cuda.get_device_name()} ({sms} SMs)")
    if args.only == "sparse":  # gpu_check.sh's sparse_attention step (no sanitizer)
        sparse_cases()
        print("all paths ran")
        return 0
    if args.only == "tome":  # gpu_check.sh's tome_memcheck step
        tome_cases()
        print("all paths ran")
        return 0
    # K=64 at 4 bits leaves too few units per warp to split: one split, direct stores with bias.
    gemm_case("one-split", 64, 200, 4, 32, 1, bias=True)
    # Small N, larger K: split-K with the fp32 workspace; tail columns (N % 4 != 0).
    gemm_case("split-k tail", 1024, 203, 4, 128, 2, torch.bfloat16, perm=True, bias=True)
    gemm_case("split-k vec", 1024, 256, 4, 128, 4, torch.float32)
    for bits in (2, 3, 8):  # every bits value, both load paths across them
        gemm_case("bits", 576, 130 if bits == 3 else 132, bits, 128, 3, act_order=bits == 8)
    gemm_case("row tile 8", 512, 96, 4, -1, 8)
    gemm_case("two row tiles", 512, 97, 3, 32, 16, bias=True)
    binary_cases()
    sparse_cases()
    if args.only == "gemv":
        tome_cases()  # racecheck / initcheck of the tome kernels (the full memcheck run has its own tome step)
        return 0
    gemm_case("dequant+cublas", 576, 131, 4, 128, 33, perm=True, bias=True)
    gemm_case("dequant+cublas", 256, 64, 3, 64, 40, torch.float32)
    for bits in (2, 3, 4, 8):
        qw, qz, sc, gi = make(256, 45, bits, 64)
        got = ops.gptq_dequantize(qw.cuda(), qz.cuda(), sc.cuda(), gi.cuda(), bits, 0)
        torch.cuda.synchronize()
        check(f"dequantize b{bits} K=256 N=45", got, ops.gptq_dequantize(qw, qz, sc, gi, bits, 0), 0.0)
    print("all paths ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
