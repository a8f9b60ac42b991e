"""Binary (1-bit weight) kernel benchmark: ``binary_gemm`` (W1A-fp) and ``binary_gemm_a1`` (W1A1)
vs torch dense ``F.linear``.

Per layer shape (K x N = in_features x out_features) and batch M it times, interleaved in one run:

- dense: ``F.linear(x, W)`` with the full-precision weight (fp32 on CPU, fp16 = cuBLAS on CUDA);
- W1A-fp: ``slimformer.ops.binary_gemm`` on the packed signs and per-row alpha of the same weight
  (BWN), x in the dense dtype;
- W1A1: ``slimformer.ops.binary_gemm_a1``: x binarized on the fly (scale 1, shift 0.1), popcount
  dot products.

Every cell first checks both ops against the fp64 reference (:mod:`slimformer.binary.reference`);
a mismatch aborts the run without writing results. Caches are flushed before each timed call
(weights come from memory, as in a model whose layers do not all fit in cache).

Use ``slimformer bench binary --help`` for the options.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .common import (CacheFlusher, KernelMismatch, fmt_us, guarded_run, is_busy, machine_facts, markdown_table,
                     parse_command_line, parse_ints, parse_shapes, publish, rel_err, time_interleaved)

SUMMARY = "1-bit weight kernels (W1A-fp and W1A1) vs torch dense F.linear"
DESCRIPTION = __doc__.split("Use ``slimformer")[0].replace("``", "")

# (K, N) = (in_features, out_features): BERT-base / MiniLM-ish square, Llama-2-7B attention and MLP.
DEFAULT_SHAPES: list[tuple[int, int]] = [(768, 768), (4096, 4096), (4096, 11008), (11008, 4096)]
DEFAULT_BATCHES = [1, 16, 64]
QUICK_SHAPES = [(768, 768), (4096, 4096)]
QUICK_BATCHES = [1, 64]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}
_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
ACT_SCALE, ACT_SHIFT = 1.0, 0.1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", type=parse_shapes, default=None, metavar="KxN[,KxN...]",
                   help="in_features x out_features (default: " + ",".join(f"{k}x{n}" for k, n in DEFAULT_SHAPES) + ")")
    p.add_argument("--batches", type=parse_ints, default=None, metavar="M[,M...]",
                   help="batch sizes (default: " + ",".join(map(str, DEFAULT_BATCHES)) + ")")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=None, help="timed calls per variant (default 25; quick 11)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per cell for all variants (default 3)")
    p.add_argument("--warm-cache", action="store_true", help="do not flush caches before each timed call")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: " + ",".join(f"{k}x{n}" for k, n in QUICK_SHAPES)
                   + " at batches " + ",".join(map(str, QUICK_BATCHES)))
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="results folder (default benchmarks/results)")
    p.add_argument("--no-write", action="store_true", help="print the table only")


def _check(name: str, y: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    err = rel_err(y, ref)
    tol = _TOLERANCE[ref.dtype]
    if y.shape != ref.shape or y.dtype != ref.dtype or not err <= tol:
        raise KernelMismatch(f"{name} is WRONG on {what}: relative error {err:.3g} > {tol:g} "
                             f"(shape {tuple(y.shape)}, dtype {y.dtype})")
    return err


def _run_shape(K: int, N: int, a, dev: torch.device, dtype: torch.dtype, flush, log) -> list[dict]:
    from .. import ops
    from ..binary.packing import binarize_weight, pack_signs
    from ..binary.reference import binary_linear_a1_reference, binary_linear_reference

    w = torch.randn(N, K, device=dev)
    positive, alpha = binarize_weight(w)
    qweight = pack_signs(positive)
    w_dense = w.to(dtype)
    del w, positive
    scale = torch.tensor(ACT_SCALE, device=dev)
    shift = torch.tensor(ACT_SHIFT, device=dev)
    dense_bytes = w_dense.nbytes
    ours_bytes = qweight.nbytes + alpha.nbytes
    rows = []
    for M in a.batches:
        x = torch.randn(M, K, device=dev).to(dtype)
        what = f"K={K} N={N} M={M} x={_NAMES[dtype]}"
        y1 = ops.binary_gemm(x, qweight, alpha, K)
        e1 = _check("binary_gemm", y1, binary_linear_reference(x, qweight, alpha, None, K), what)
        ya = ops.binary_gemm_a1(x, qweight, alpha, scale, shift, K)
        ea = _check("binary_gemm_a1", ya, binary_linear_a1_reference(x, qweight, alpha, None, scale, shift, K), what)
        del y1, ya
        fns = {
            "dense": lambda: F.linear(x, w_dense),
            "w1afp": lambda: ops.binary_gemm(x, qweight, alpha, K),
            "w1a1": lambda: ops.binary_gemm_a1(x, qweight, alpha, scale, shift, K),
        }
        t = time_interleaved(fns, a.device, a.warmup, a.reps, 3, a.budget, flush)
        row = {"K": K, "N": N, "M": M,
               "dense": {**t["dense"].as_dict(), "weight_bytes": dense_bytes},
               "w1afp": {**t["w1afp"].as_dict(), "weight_bytes": ours_bytes, "rel_err": e1},
               "w1a1": {**t["w1a1"].as_dict(), "weight_bytes": ours_bytes, "rel_err": ea}}
        for v in ("dense", "w1afp", "w1a1"):
            row[v]["gb_per_s"] = row[v]["weight_bytes"] / (row[v]["median_us"] * 1e-6) / 1e9
        row["w1afp_speedup"] = row["dense"]["median_us"] / row["w1afp"]["median_us"]
        row["w1a1_speedup"] = row["dense"]["median_us"] / row["w1a1"]["median_us"]
        rows.append(row)
        log(f"  {K:>5}x{N:<5} M={M:<3} dense {fmt_us(row['dense']['median_us']):>8} us  "
            f"W1A-fp {fmt_us(row['w1afp']['median_us']):>8} us ({row['w1afp_speedup']:.1f}x)  "
            f"W1A1 {fmt_us(row['w1a1']['median_us']):>8} us ({row['w1a1_speedup']:.1f}x)")
        del x, fns, t
    return rows


def _markdown(payload: dict) -> str:
    m, c = payload["machine"], payload["config"]
    dense = "fp32" if c["device"] == "cpu" else "fp16 (cuBLAS)"
    where = (f"{m['gpu']} (CUDA {m['cuda_runtime']})" if c["device"] == "cuda" else
             f"{m['cpu_model']}; {m['cpu_count']} CPUs, torch threads {m['torch_threads']}; "
             f"SIMD: {', '.join(m.get('cpu_simd') or []) or '-'}; slimformer CPU kernel {m['active_cpu_isa']}")
    commit = m["git_commit"] + (" (uncommitted changes)" if m.get("git_dirty") else "")
    body = [[f"{r['K']}x{r['N']}", r["M"], fmt_us(r["dense"]["median_us"]), fmt_us(r["w1afp"]["median_us"]),
             fmt_us(r["w1a1"]["median_us"]), f"{r['w1afp_speedup']:.1f}x", f"{r['w1a1_speedup']:.1f}x",
             f"{r['dense']['gb_per_s']:.1f}", f"{r['w1afp']['gb_per_s']:.1f}"] for r in payload["rows"]]
    table = markdown_table(["K x N", "M", f"dense {dense} us", "W1A-fp us", "W1A1 us", "W1A-fp vs dense",
                            "W1A1 vs dense", "dense GB/s", "W1A-fp GB/s"], body, align="l" + "r" * 8)
    return "\n".join([
        f"# Binary kernel benchmark: {c['device']}" + (" (quick)" if c["quick"] else ""), "",
        f"- date: {m['date']}; command: `{c['command_line']}`",
        f"- machine: {where}",
        f"- torch {m['torch']}, slimformer {m['slimformer']}, commit {commit}",
        f"- load average (1 min) at start / end: {m['load_avg_1m_at_start']:.2f} / {m['load_avg_1m_at_end']:.2f}"
        + (" -- **the machine was busy: these numbers are unreliable**" if m["busy"] else ""),
        f"- x {c['x_dtype']} for dense and W1A-fp; W1A1 binarizes x (scale {ACT_SCALE}, shift {ACT_SHIFT}); median of up"
        f" to {c['reps']} reps, variants interleaved; cache {c['cache']}", "",
        table, "",
        "- us = median microseconds per call; X vs dense = dense time / X time (above 1 = faster than dense).",
        "- GB/s = weight bytes per call / time (dense: K*N*dtype size; binary: packed signs + fp32 alpha, "
        "K*N/8 + 4N bytes).",
        "- Both ops were checked against the fp64 reference before timing (relative errors in the JSON).", ""])


def run(args: argparse.Namespace, log=print) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    custom = args.shapes is not None or args.batches is not None
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    args.batches = args.batches or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    args.reps = args.reps or (11 if args.quick else 25)
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    dev = torch.device(args.device)
    machine = machine_facts(args.device)
    if is_busy(args.device, machine):
        log(f"WARNING: load average {machine['load_avg_1m_at_start']:.2f}: other work is running, timings are noisy")
    flush = None if args.warm_cache else CacheFlusher(args.device)
    config = {"device": args.device, "x_dtype": _NAMES[dtype], "shapes": [list(s) for s in args.shapes],
              "batches": list(args.batches), "warmup": args.warmup, "reps": args.reps, "budget_s": args.budget,
              "seed": args.seed, "quick": args.quick,
              "cache": "warm" if flush is None else f"flushed ({flush.nbytes >> 20} MiB written before each call)",
              "command_line": getattr(args, "command_line", " ".join(sys.argv))}
    log(f"slimformer binary benchmark on {machine['gpu'] or machine['cpu_model']}, torch {machine['torch']}")
    torch.manual_seed(args.seed)
    rows: list[dict] = []
    with torch.no_grad():
        for K, N in args.shapes:
            rows += _run_shape(K, N, args, dev, dtype, flush, log)
            gc.collect()
    machine["load_avg_1m_at_end"] = os.getloadavg()[0]
    machine["busy"] = is_busy(args.device, machine)
    payload = {"benchmark": "binary", "machine": machine, "config": config, "rows": rows}
    tag = ("_quick" if args.quick else "_custom" if custom else "") + ("_warm" if args.warm_cache else "")
    publish(f"binary_{args.device}{tag}", payload, _markdown(payload), args.out, not args.no_write, log)
    return payload


def run_cli(args: argparse.Namespace) -> int:
    return guarded_run(run, args)


def main(argv: Sequence[str] | None = None, prog: str = "bench_binary") -> int:
    """Stand-alone entry point (``benchmarks/bench_binary.py``)."""
    return run_cli(parse_command_line(add_arguments, DESCRIPTION, prog, argv))


if __name__ == "__main__":
    sys.exit(main(prog="python -m slimformer.bench.binary"))
