"""Sparse attention kernel benchmark: ``slimformer.ops.sparse_attention`` with a sliding window vs
torch's dense ``F.scaled_dot_product_attention``, SDPA with the explicit n x n mask, and
FlexAttention (``torch.compile(flex_attention)`` with the same rule as a BlockMask).

Per sequence length n, window w and head dim d (batch, heads fixed) it times, interleaved in one run:

- dense: ``F.scaled_dot_product_attention(q, k, v)`` (full attention: the cost sparse attention removes);
- masked: SDPA with the pattern's dense boolean mask (the "explicit mask" route; O(n^2) memory, skipped
  above ``--masked-max-len``);
- flex: ``torch.compile(flex_attention)`` with ``create_block_mask(|q - kv| < w)`` (blocks of 128, its default);
- ours: ``slimformer.ops.sparse_attention`` with ``SlidingWindow(w, causal=False)`` (|i - j| < w).

``--decode`` times one new query over n cached keys instead (causal window; flex left out), the
per-token cost of generating with a KV cache.

Each cell first checks ours against masked SDPA (or against flex where masked is skipped). Dense
does not depend on w: it is timed in the first window's cell of each (n, d) and reused. Peak memory
is the extra resident memory (CPU: VmHWM after a reset of the high-water mark) or
``torch.cuda.max_memory_allocated`` growth of one call. ``--backward`` times forward + backward instead (flex
has no CPU backward in torch 2.13, so it is left out there).

Use ``slimformer bench sparse --help`` for the options.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .common import (KernelMismatch, fmt_us, guarded_run, is_busy, machine_facts, markdown_table, parse_command_line,
                     parse_ints, publish, rel_err, time_interleaved)

SUMMARY = "sparse (sliding-window) attention vs dense SDPA, masked SDPA and FlexAttention"
DESCRIPTION = __doc__.split("Use ``slimformer")[0].replace("``", "")

DEFAULT_LENGTHS = [1024, 4096, 16384, 32768]
DEFAULT_WINDOWS = [256, 512]
DEFAULT_HEAD_DIMS = [64, 128]
QUICK_LENGTHS, QUICK_WINDOWS, QUICK_HEAD_DIMS = [1024, 4096], [256], [64]
VARIANTS = ("dense", "masked", "flex", "ours")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=parse_ints, default=None, metavar="N[,N...]",
                   help="sequence lengths (default " + ",".join(map(str, DEFAULT_LENGTHS)) + ")")
    p.add_argument("--windows", type=parse_ints, default=None, metavar="W[,W...]",
                   help="window: keys on each side, the query included (default " + ",".join(map(str, DEFAULT_WINDOWS)) + ")")
    p.add_argument("--head-dims", type=parse_ints, default=None, metavar="D[,D...]",
                   help="head dims (default " + ",".join(map(str, DEFAULT_HEAD_DIMS)) + ")")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="default fp32 on CPU, fp16 on CUDA")
    p.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    p.add_argument("--flex-block", type=int, default=128, help="FlexAttention BlockMask block size (default 128, its own)")
    p.add_argument("--decode", action="store_true",
                   help="one new query over n cached keys (causal window p - w < j <= p; dense = SDPA over all n keys)")
    p.add_argument("--backward", action="store_true", help="time forward + backward (gradients of q, k, v)")
    p.add_argument("--dense-max-len", type=int, default=32768, help="skip dense SDPA above this n")
    p.add_argument("--masked-max-len", type=int, default=16384,
                   help="skip SDPA with an explicit mask above this n (its n x n mask; default 16384)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="timed calls per variant (default 9; quick 5)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per cell for all variants (default 20)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: n " + ",".join(map(str, QUICK_LENGTHS))
                   + ", w " + ",".join(map(str, QUICK_WINDOWS)) + ", d " + ",".join(map(str, QUICK_HEAD_DIMS)))
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="results folder (default benchmarks/results)")
    p.add_argument("--no-write", action="store_true", help="print the table only")


# -- peak memory of one call ---------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _malloc_returns_memory() -> None:
    """glibc: serve every block >= 128 KiB by mmap (fixed threshold, not the adaptive one) and trim, so
    freed tensors leave the resident set and the next call's peak is not hidden by reused heap."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Memory one call of ``fn`` needs beyond what is already allocated (its output included)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    try:  # Linux: writing 5 to clear_refs resets VmHWM (the resident high-water mark) to the current RSS
        _malloc_returns_memory()
        gc.collect()
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
        out = fn()
        peak = _rss_kib("VmHWM") - base
        del out
        return max(peak, 0) * 1024
    except OSError:
        return None


# -- variants --------------------------------------------------------------------------------------
_FLEX: dict = {}


def _flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        _FLEX["fn"], _FLEX["create_block_mask"] = torch.compile(flex_attention), create_block_mask
    return _FLEX["fn"], _FLEX["create_block_mask"]


def plan_mask(q_len: int, n: int, w: int, dev) -> torch.Tensor:
    """The benchmark's rule as a dense bool mask [q_len, n]: |i - j| < w, or for decoding (q_len < n,
    the last q_len positions) the causal window p - w < j <= p."""
    j = torch.arange(n, device=dev)[None]
    p = torch.arange(n - q_len, n, device=dev)[:, None]
    return (p - j).abs() < w if q_len == n else (j <= p) & (p - j < w)


def _make_fns(a, q, k, v, n: int, w: int, plan, variants: set[str]) -> tuple[dict, dict]:
    """Callables per variant (forward, or forward + backward) and the forward outputs for checking."""
    from .. import ops

    dev = q.device
    fwd: dict[str, Callable[[], torch.Tensor]] = {}
    if "dense" in variants:
        fwd["dense"] = lambda: F.scaled_dot_product_attention(q, k, v)
    if "masked" in variants:
        mask = plan_mask(q.shape[2], n, w, dev)
        fwd["masked"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if "flex" in variants:
        flex, create_block_mask = _flex()

        def window(b, h, qi, kv):
            return (qi - kv).abs() < w

        block_mask = create_block_mask(window, None, None, n, n, device=str(dev), BLOCK_SIZE=a.flex_block)
        fwd["flex"] = lambda: flex(q, k, v, block_mask=block_mask)
    if "ours" in variants:
        fwd["ours"] = lambda: ops.sparse_attention(q, k, v, plan)
    with torch.no_grad():
        outs = {name: fn() for name, fn in fwd.items() if name != "dense"}
    if not a.backward:
        return fwd, outs
    grad = torch.randn_like(q)

    def with_backward(fn):
        def run():
            for t in (q, k, v):
                t.grad = None
            fn().backward(grad)
        return run

    return {name: with_backward(fn) for name, fn in fwd.items()}, outs


def _check(outs: dict, what: str) -> dict:
    """ours vs masked SDPA (exact rule) or, without it, vs flex; returns the errors."""
    errs = {}
    ref_name = "masked" if "masked" in outs else "flex" if "flex" in outs else None
    if "ours" in outs and ref_name is not None:
        ref = outs[ref_name]
        err = rel_err(outs["ours"], ref)
        tol = _TOLERANCE[ref.dtype]
        if not err <= tol:
            raise KernelMismatch(f"sparse_attention is WRONG on {what}: relative error {err:.3g} vs {ref_name} > {tol:g}")
        errs[f"ours_vs_{ref_name}"] = err
    return errs


def _run_cell(a, n: int, w: int, d: int, dense_cache: dict, log) -> dict:
    from ..attention import SlidingWindow

    dev, dtype = torch.device(a.device), a.dtype_t
    variants = set(a.variant_list)
    if n > a.dense_max_len or (n, d) in dense_cache:
        variants.discard("dense")
    if n > a.masked_max_len:
        variants.discard("masked")
    if (a.backward and a.device == "cpu") or a.decode:
        variants.discard("flex")  # torch 2.13: "FlexAttention does not support backward on CPU"; decode: 1 query
    q_len = 1 if a.decode else n
    q = torch.randn(a.batch, a.heads, q_len, d, device=dev, dtype=dtype).requires_grad_(a.backward)
    k, v = (torch.randn(a.batch, a.heads, n, d, device=dev, dtype=dtype).requires_grad_(a.backward) for _ in range(2))
    plan = (SlidingWindow(w, causal=True).plan(1, n, device=dev) if a.decode
            else SlidingWindow(w, causal=False).plan(n, device=dev))
    what = f"n={n} w={w} d={d}"
    fns, outs = _make_fns(a, q, k, v, n, w, plan, variants)
    errs = _check(outs, what)
    del outs
    memory = {name: peak_extra_bytes(fn, a.device) for name, fn in fns.items()}
    gc.collect()
    times = time_interleaved(fns, a.device, a.warmup, a.reps, 3, a.budget)
    row = {"n": n, "w": w, "d": d, "errors": errs, "density": plan.density(),
           "keys_per_query": (min(n, w) if a.decode else min(n, 2 * w - 1)) / n}
    for name in VARIANTS:
        if name in times:
            row[name] = {**times[name].as_dict(), "peak_bytes": memory.get(name)}
    if "dense" in row:
        dense_cache[(n, d)] = row["dense"]
    elif (n, d) in dense_cache and "dense" in a.variant_list:
        row["dense"] = {**dense_cache[(n, d)], "reused": True}
    for name in ("masked", "flex", "ours"):
        if name in row and "dense" in row:
            row[f"{name}_vs_dense"] = row["dense"]["median_us"] / row[name]["median_us"]
    if "ours" in row and "flex" in row:
        row["ours_vs_flex"] = row["flex"]["median_us"] / row["ours"]["median_us"]
    parts = [f"{name} {fmt_us(row[name]['median_us'])} us" for name in VARIANTS if name in row]
    log(f"  n={n:<6} w={w:<4} d={d:<3} " + "  ".join(parts)
        + (f"  ours vs dense {row['ours_vs_dense']:.1f}x" if "ours_vs_dense" in row else "")
        + (f"  vs flex {row['ours_vs_flex']:.2f}x" if "ours_vs_flex" in row else ""))
    return row


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _markdown(payload: dict) -> str:
    m, c = payload["machine"], payload["config"]
    where = (f"{m['gpu']} (CUDA {m['cuda_runtime']})" if c["device"] == "cuda" else
             f"{m['cpu_model']}; {m['cpu_count']} CPUs, torch threads {m['torch_threads']}; "
             f"SIMD: {', '.join(m.get('cpu_simd') or []) or '-'}; slimformer CPU kernel {m['active_cpu_isa']}")
    commit = m["git_commit"] + (" (uncommitted changes)" if m.get("git_dirty") else "")

    def us(r, name):
        return fmt_us(r[name]["median_us"]) + ("*" if r[name].get("reused") else "") if name in r else "-"

    def ratio(r, key):
        return f"{r[key]:.1f}x" if key in r else "-"

    body = [[r["n"], r["w"], r["d"], us(r, "dense"), us(r, "masked"), us(r, "flex"), us(r, "ours"),
             ratio(r, "ours_vs_dense"), f"{r['ours_vs_flex']:.2f}x" if "ours_vs_flex" in r else "-",
             ratio(r, "flex_vs_dense"), f"{1 / r['keys_per_query']:.1f}x",
             _mib(r.get("dense", {}).get("peak_bytes")), _mib(r.get("masked", {}).get("peak_bytes")),
             _mib(r.get("flex", {}).get("peak_bytes")), _mib(r.get("ours", {}).get("peak_bytes"))]
            for r in payload["rows"]]
    table = markdown_table(["n", "w", "d", "dense us", "masked us", "flex us", "ours us", "ours vs dense",
                            "ours vs flex", "flex vs dense", "ideal", "dense MiB", "masked MiB", "flex MiB",
                            "ours MiB"], body, align="rrr" + "r" * 12)
    mode = ("forward + backward" if c["backward"] else "forward") + (", decode (1 query over n cached keys)"
                                                                      if c.get("decode") else "")
    return "\n".join([
        f"# Sparse attention benchmark: {c['device']}, {mode}" + (" (quick)" if c["quick"] else ""), "",
        f"- date: {m['date']}; command: `{c['command_line']}`",
        f"- machine: {where}",
        f"- torch {m['torch']}, slimformer {m['slimformer']}, commit {commit}",
        f"- load average (1 min) at start / end: {m['load_avg_1m_at_start']:.2f} / {m['load_avg_1m_at_end']:.2f}"
        + (" -- **the machine was busy: these numbers are unreliable**" if m["busy"] else ""),
        f"- batch {c['batch']}, {c['heads']} heads, {c['dtype']}; "
        + ("causal window p - w < j <= p for the last position" if c.get("decode") else "bidirectional window |i - j| < w")
        + "; median of up to "
        f"{c['reps']} reps, variants interleaved", "",
        table, "",
        "- us = median microseconds per call (* = dense timed in the first window's cell of this n, d); "
        "X vs Y = Y time / X time (above 1 = X faster).",
        "- ideal = n / allowed keys per query (2w - 1, or w when decoding): the speed-up over dense if only the "
        "allowed pairs cost time.",
        "- MiB = extra peak memory of one call (CPU: resident high-water mark; CUDA: allocator peak), output included.",
        "- ours was checked against masked SDPA (or flex where masked is skipped) before timing; errors in the JSON.",
        ""])


def run(args: argparse.Namespace, log=print) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    custom = any(x is not None for x in (args.lengths, args.windows, args.head_dims))
    args.lengths = args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    args.windows = args.windows or (QUICK_WINDOWS if args.quick else DEFAULT_WINDOWS)
    args.head_dims = args.head_dims or (QUICK_HEAD_DIMS if args.quick else DEFAULT_HEAD_DIMS)
    args.reps = args.reps or (5 if args.quick else 9)
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    args.dtype_t = _DTYPES[args.dtype]
    args.variant_list = [v for v in args.variants.split(",") if v]
    bad = set(args.variant_list) - set(VARIANTS)
    if bad:
        raise SystemExit(f"unknown variants {sorted(bad)}; choose from {','.join(VARIANTS)}")
    machine = machine_facts(args.device)
    if is_busy(args.device, machine):
        log(f"WARNING: load average {machine['load_avg_1m_at_start']:.2f}: other work is running, timings are noisy")
    config = {"device": args.device, "dtype": args.dtype, "lengths": args.lengths, "windows": args.windows,
              "head_dims": args.head_dims, "heads": args.heads, "batch": args.batch, "variants": args.variant_list,
              "backward": args.backward, "decode": args.decode, "flex_block": args.flex_block, "warmup": args.warmup, "reps": args.reps, "budget_s": args.budget,
              "dense_max_len": args.dense_max_len, "masked_max_len": args.masked_max_len, "seed": args.seed,
              "quick": args.quick, "command_line": getattr(args, "command_line", " ".join(sys.argv))}
    log(f"slimformer sparse attention benchmark on {machine['gpu'] or machine['cpu_model']}, torch {machine['torch']}")
    torch.manual_seed(args.seed)
    rows, dense_cache = [], {}
    grad_mode = torch.enable_grad() if args.backward else torch.no_grad()
    with grad_mode:
        for d in args.head_dims:
            for n in args.lengths:
                for w in args.windows:
                    rows.append(_run_cell(args, n, w, d, dense_cache, log))
                    gc.collect()
    machine["load_avg_1m_at_end"] = os.getloadavg()[0]
    machine["busy"] = is_busy(args.device, machine)
    payload = {"benchmark": "sparse", "machine": machine, "config": config, "rows": rows}
    tag = (("_quick" if args.quick else "_custom" if custom else "") + ("_bwd" if args.backward else "")
           + ("_decode" if args.decode else ""))
    publish(f"sparse_{args.device}{tag}", payload, _markdown(payload), args.out, not args.no_write, log)
    return payload


def run_cli(args: argparse.Namespace) -> int:
    return guarded_run(run, args)


def main(argv: Sequence[str] | None = None, prog: str = "bench_sparse") -> int:
    """Stand-alone entry point (``benchmarks/bench_sparse.py``)."""
    return run_cli(parse_command_line(add_arguments, DESCRIPTION, prog, argv))


if __name__ == "__main__":
    sys.exit(main(prog="python -m slimformer.bench.sparse"))
