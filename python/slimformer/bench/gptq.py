"""GPTQ kernel benchmark: slimformer's ``gptq_gemm`` vs torch dense ``F.linear`` vs torch's int4 kernel.

Per real LLM layer shape (K x N = in_features x out_features) and batch M it times, interleaved
in one run:

- dense: ``F.linear(x, W)`` with the original weight (fp32 on CPU, fp16 = cuBLAS on CUDA);
- ours: ``slimformer.ops.gptq_gemm`` on the buffers of
  ``QuantLinear.from_linear(nn.Linear(K, N, bias=False), bits, group_size)``;
- ours a8 (CPU, where the build has it): ``slimformer.ops.gptq_gemm_a8``, the same weights with x
  quantized on the fly to int8 per 32 inputs (``QuantLinear(..., int8_activations=True)``);
- torch int4, the peer to beat: on CPU ``aten._weight_int4pack_mm_for_cpu`` (bf16 activations,
  weight packed by ``aten._convert_weight_to_int4pack_for_cpu``); on CUDA, when this torch build
  has it, ``aten._weight_int4pack_mm`` (tinygemm). Both need 4 bits and K % group_size == 0; the
  same quantized integers, scales and zeros as ours are fed to it, so all variants compute the
  same function (up to activation rounding).

Before timing, every (shape, M) cell checks ours, ours a8 (on its int8-quantized x) and torch
int4 against ``F.linear`` on the weight dequantized by the pure-PyTorch reference (and checks
``slimformer.ops.gptq_dequantize`` against that reference once per shape); a mismatch aborts the
run without writing results.

Use ``slimformer bench gptq --help`` for the options.
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

from .common import (BUSY_LOAD, CacheFlusher, KernelMismatch, default_out_dir, fmt_us as _fmt_us, guarded_run,
                     is_busy as _busy, machine_facts, markdown_table, parse_command_line, parse_ints as _parse_ints,
                     parse_shapes as _parse_shapes, publish, rel_err as _rel_err, time_interleaved)

SUMMARY = "GPTQ dequantize-matmul vs torch dense F.linear and torch's int4 kernel on LLM layer shapes"
DESCRIPTION = __doc__.split("Use ``slimformer")[0].replace("``", "")

# (K, N) = (in_features, out_features) and where the shape comes from.
DEFAULT_SHAPES: list[tuple[int, int]] = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (576, 1536),
                                         (1536, 576)]
SHAPE_LABELS = {
    (4096, 4096): "Llama-2-7B q/k/v/o_proj",
    (4096, 11008): "Llama-2-7B gate/up_proj",
    (11008, 4096): "Llama-2-7B down_proj",
    (8192, 8192): "Llama-2-70B q/o_proj",
    (576, 1536): "SmolLM2-135M gate/up_proj",
    (1536, 576): "SmolLM2-135M down_proj",
}
DEFAULT_BATCHES = [1, 4, 16, 64, 256]
QUICK_SHAPES = [(576, 1536), (1536, 576), (4096, 4096)]
QUICK_BATCHES = [1, 16]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# ||out - ref|| / ||ref|| allowed, by the activation dtype the kernel ran in.
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


# -- arguments --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="weight bits (default 4)")
    p.add_argument("--group-size", type=int, default=128,
                   help="quantization group size along in_features; -1 = one group per row (default 128)")
    p.add_argument("--shapes", type=_parse_shapes, default=None, metavar="KxN[,KxN...]",
                   help="layer shapes as in_features x out_features (default: "
                        + ",".join(f"{k}x{n}" for k, n in DEFAULT_SHAPES) + ")")
    p.add_argument("--batches", type=_parse_ints, default=None, metavar="M[,M...]",
                   help="batch sizes M (rows of x) (default: " + ",".join(map(str, DEFAULT_BATCHES)) + ")")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                   help="activation dtype for slimformer's kernel (default fp32 on CPU, fp16 on CUDA); the "
                        "dense baseline is always fp32 on CPU and fp16 on CUDA, torch int4 always bf16")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant first (default 3)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed calls per variant; the median is reported (default 25, at most)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per (shape, M) cell for all variants together: slow cells use fewer reps, "
                        "never fewer than --min-reps; 0 = always --reps (default 3)")
    p.add_argument("--min-reps", type=int, default=3, help="lower bound on reps under --budget (default 3)")
    p.add_argument("--no-a8", action="store_true",
                   help="skip the int8-activation variant (slimformer.ops.gptq_gemm_a8; CPU only)")
    p.add_argument("--warm-cache", action="store_true",
                   help="do not flush the caches before each timed call (default: flush, so weights come from "
                        "memory as in LLM decoding; warm-cache numbers flatter small layers)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs (default 0)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: shapes " + ",".join(f"{k}x{n}" for k, n in QUICK_SHAPES) + ", batches "
                        + ",".join(map(str, QUICK_BATCHES)) + ", fewer reps (about a minute on 2 cores)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="results folder (default: benchmarks/results inside a slimformer checkout, else "
                        "./slimformer-bench-results)")
    p.add_argument("--no-write", action="store_true", help="print the table only, write no files")


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    a = argparse.Namespace(**vars(args))
    a.custom = any(getattr(args, k) is not None for k in ("shapes", "batches")) or args.bits != 4 \
        or args.group_size != 128 or args.dtype is not None or args.warm_cache or args.no_a8
    a.shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    a.batches = args.batches or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    a.warmup = args.warmup if args.warmup is not None else 3
    a.reps = args.reps if args.reps is not None else (15 if args.quick else 25)
    a.budget = args.budget if args.budget is not None else (1.5 if args.quick else 3.0)
    if a.group_size != -1 and a.group_size <= 0:
        raise SystemExit(f"--group-size must be positive or -1, got {a.group_size}")
    if a.reps < 1 or a.warmup < 0 or a.min_reps < 1:
        raise SystemExit("--reps and --min-reps must be >= 1 and --warmup >= 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    a.x_dtype = _DTYPES[args.dtype] if args.dtype else (torch.float32 if a.device == "cpu" else torch.float16)
    a.dense_dtype = torch.float32 if a.device == "cpu" else torch.float16
    a.out = args.out if args.out is not None else default_out_dir()
    a.a8 = not args.no_a8 and a.device == "cpu" and hasattr(torch.ops.slimformer, "gptq_gemm_a8")
    return a


# -- the variants -----------------------------------------------------------------------------
def _int4_reason(bits: int, K: int, N: int, group: int, device: str) -> str | None:
    """Why torch's int4 kernel cannot run this configuration (None if it can)."""
    if bits != 4:
        return "n/a (int4 only)"
    if K % group:
        return "n/a (K % group != 0)"
    if group not in (32, 64, 128, 256):
        return "n/a (group not 32/64/128/256)"
    if device == "cpu" and N % 16:
        return "n/a (N % 16 != 0)"
    return None


def _short(e: Exception) -> str:
    return f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:50]})" if str(e) else f"n/a ({type(e).__name__})"


def _tinygemm_params(qlin, K: int, N: int, group: int):
    """The quantized integers as torch wants them: q [N, K] int32 and scales_and_zeros [G, N, 2] bf16.

    torch's int4 kernels compute W[n, k] = (q - 8) * scale + zero with a float zero point, so
    GPTQ's W = s * (q - z) is scale = s, zero = s * (8 - z).
    """
    from ..gptq.packing import unpack_cols, unpack_rows

    q = unpack_rows(qlin.qweight, 4, K).t().contiguous().to(torch.int32)  # [N, K]
    z = unpack_cols(qlin.qzeros, 4, N).to(torch.float32) + qlin.zero_offset  # [G, N]
    s = qlin.scales.to(torch.float32)
    assert s.shape[0] == K // group
    sz = torch.stack([s, s * (8.0 - z)], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
    return q, sz


def _torch_int4_cpu(qlin, K: int, N: int, group: int):
    q, sz = _tinygemm_params(qlin, K, N, group)
    # innerKTiles is ignored by the CPU packing (1, 2, 4, 8 give identical bytes); 8 as torchao uses.
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)  # [N, K/2] uint8
    del q

    def call(x_bf16):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, packed, group, sz)

    return call, packed.nbytes + sz.nbytes


def _torch_int4_cuda(qlin, K: int, N: int, group: int):
    q, sz = _tinygemm_params(qlin, K, N, group)
    # torch >= 2.5 takes the weight as uint8 [N, K/2], two values per byte, even k in the high nibble.
    q_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    del q
    packed = torch.ops.aten._convert_weight_to_int4pack(q_u8, 8)
    del q_u8

    def call(x_bf16):
        return torch.ops.aten._weight_int4pack_mm(x_bf16, packed, group, sz)

    return call, packed.nbytes + sz.nbytes


def _run_shape(a, K: int, N: int, dev: torch.device, flush, log) -> list[dict]:
    from .. import ops
    from ..gptq.reference import dequantize_reference, quantize_activations_a8
    from ..nn import QuantLinear

    group = K if a.group_size == -1 else a.group_size
    lin = torch.nn.Linear(K, N, bias=False, device=dev)
    qlin = QuantLinear.from_linear(lin, bits=a.bits, group_size=a.group_size)
    assert qlin._perm is None, "sequential groups expected"
    qw, qz, sc, gi, zo = qlin.qweight, qlin.qzeros, qlin.scales, qlin.g_idx, qlin.zero_offset
    w_dense = lin.weight.detach().to(a.dense_dtype).contiguous()  # [N, K]
    del lin

    # The reference weight (fp32, pure PyTorch) and the dequantize op against it.
    w_ref = dequantize_reference(qw, qz, sc, gi, a.bits, zo, dtype=torch.float32)  # [K, N]
    w_op = ops.gptq_dequantize(qw, qz, sc.float(), gi, a.bits, zo)
    err = float((w_op.float() - w_ref).abs().max())
    if err > 1e-6 * float(w_ref.abs().max()):
        raise KernelMismatch(f"{K}x{N}: slimformer.ops.gptq_dequantize differs from the reference by {err:.3g}")
    del w_op
    w_ref_t = w_ref.t().contiguous()  # [N, K]
    del w_ref

    dense_bytes = w_dense.numel() * w_dense.element_size()
    ours_bytes = qw.nbytes + qz.nbytes + sc.nbytes
    int4_reason = _int4_reason(a.bits, K, N, group, a.device)
    int4_call, int4_bytes = None, None
    if int4_reason is None:
        try:
            int4_call, int4_bytes = (_torch_int4_cpu if a.device == "cpu" else _torch_int4_cuda)(qlin, K, N, group)
        except Exception as e:  # noqa: BLE001 (a torch build without the op or with other limits)
            int4_reason = _short(e)
            log(f"  torch int4 unavailable for {K}x{N}: {e}")

    rows = []
    for M in a.batches:
        x = torch.randn(M, K, device=dev).to(a.x_dtype)
        x_dense = x.to(a.dense_dtype)
        x_bf16 = x.to(torch.bfloat16)

        def ours():
            return ops.gptq_gemm(x, qw, qz, sc, gi, a.bits, zo)

        def dense():
            return F.linear(x_dense, w_dense)

        # Correctness first: ours (and the peer) against F.linear on the reference weight.
        y = ours()
        ref = F.linear(x.float(), w_ref_t)
        ours_err = _rel_err(y, ref)
        if y.shape != (M, N) or y.dtype != x.dtype or not ours_err <= _TOLERANCE[x.dtype]:
            raise KernelMismatch(
                f"slimformer gptq_gemm is WRONG on K={K} N={N} M={M} bits={a.bits} group={a.group_size} "
                f"x={_DTYPE_NAMES[x.dtype]}: relative error {ours_err:.3g} > {_TOLERANCE[x.dtype]:g} "
                f"(shape {tuple(y.shape)}, dtype {y.dtype})")
        fns = {"dense": dense, "ours": ours}
        a8_err = a8_err_exact = None
        if a.a8:
            def ours_a8():
                return ops.gptq_gemm_a8(x, qw, qz, sc, gi, a.bits, zo)

            y8 = ours_a8()
            ref8 = F.linear(quantize_activations_a8(x, gi).float(), w_ref_t)
            a8_err, a8_err_exact = _rel_err(y8, ref8), _rel_err(y8, ref)
            if y8.shape != (M, N) or y8.dtype != x.dtype or not a8_err <= _TOLERANCE[x.dtype]:
                raise KernelMismatch(
                    f"slimformer gptq_gemm_a8 is WRONG on K={K} N={N} M={M} bits={a.bits} group={a.group_size} "
                    f"x={_DTYPE_NAMES[x.dtype]}: relative error {a8_err:.3g} > {_TOLERANCE[x.dtype]:g} against "
                    f"its reference (int8-quantized x), shape {tuple(y8.shape)}, dtype {y8.dtype}")
            fns["a8"] = ours_a8
            del y8, ref8
        int4_err, reason = None, int4_reason
        if int4_call is not None:
            try:
                y4 = int4_call(x_bf16)
            except Exception as e:  # noqa: BLE001 (limits of torch's kernel that we did not foresee)
                log(f"  torch int4 failed on {K}x{N} M={M}: {e}")
                y4, reason = None, _short(e)
        if int4_call is not None and y4 is not None:
            ref4 = F.linear(x_bf16.float(), w_ref_t)
            int4_err = _rel_err(y4, ref4)
            if not int4_err <= _TOLERANCE[torch.bfloat16]:
                msg = (f"torch int4 peer disagrees with the reference on K={K} N={N} M={M}: relative error "
                       f"{int4_err:.3g} (the benchmark's weight packing for torch is wrong)")
                if a.device == "cpu":
                    raise KernelMismatch(msg)
                log("  " + msg + "; reporting it as n/a")
                reason, int4_err = "n/a (verification failed)", None
            else:
                fns["int4"] = lambda: int4_call(x_bf16)
        del y, ref

        t = time_interleaved(fns, a.device, a.warmup, a.reps, a.min_reps, a.budget, flush)
        row = {
            "K": K, "N": N, "M": M, "layer": SHAPE_LABELS.get((K, N), ""),
            "dense": {**t["dense"].as_dict(), "dtype": _DTYPE_NAMES[a.dense_dtype], "weight_bytes": dense_bytes},
            "ours": {**t["ours"].as_dict(), "dtype": _DTYPE_NAMES[a.x_dtype], "weight_bytes": ours_bytes,
                     "rel_err": ours_err},
            "a8": ({**t["a8"].as_dict(), "dtype": _DTYPE_NAMES[a.x_dtype] + " -> int8", "weight_bytes": ours_bytes,
                    "rel_err": a8_err, "rel_err_vs_exact": a8_err_exact} if "a8" in t else {"skipped": "n/a"}),
            "int4": ({**t["int4"].as_dict(), "dtype": "bf16", "weight_bytes": int4_bytes, "rel_err": int4_err}
                     if "int4" in t else {"skipped": reason}),
        }
        for v in ("dense", "ours", "a8", "int4"):
            if "median_us" in row[v]:
                row[v]["gb_per_s"] = row[v]["weight_bytes"] / (row[v]["median_us"] * 1e-6) / 1e9
        row["speedup_vs_dense"] = row["dense"]["median_us"] / row["ours"]["median_us"]
        row["speedup_vs_int4"] = (row["int4"]["median_us"] / row["ours"]["median_us"]
                                  if "median_us" in row["int4"] else None)
        if "median_us" in row["a8"]:
            row["a8_speedup_vs_dense"] = row["dense"]["median_us"] / row["a8"]["median_us"]
            row["a8_speedup_vs_int4"] = (row["int4"]["median_us"] / row["a8"]["median_us"]
                                         if "median_us" in row["int4"] else None)
        rows.append(row)
        int4_text = f"{_fmt_us(row['int4']['median_us'])} us" if "median_us" in row["int4"] else reason
        log(f"  {K:>5}x{N:<5} M={M:<4} dense {_fmt_us(row['dense']['median_us']):>8} us  "
            f"ours {_fmt_us(row['ours']['median_us']):>8} us  "
            + (f"a8 {_fmt_us(row['a8']['median_us']):>8} us  " if "median_us" in row["a8"] else "")
            + f"int4 {int4_text}  "
            f"(reps {row['ours']['reps']}, rel err {ours_err:.1e})")
        del x, x_dense, x_bf16, fns, t
    del qlin, qw, qz, sc, gi, w_dense, w_ref_t, int4_call
    return rows


# -- report -----------------------------------------------------------------------------------
def _table(rows: list[dict], device: str) -> str:
    dense_name = "dense fp32" if device == "cpu" else "dense fp16"
    a8 = any("median_us" in r["a8"] for r in rows)

    def us(v):
        return _fmt_us(v["median_us"]) if "median_us" in v else v.get("skipped", "-")

    def gbs(v):
        return f"{v['gb_per_s']:.1f}" if "gb_per_s" in v else "-"

    def ratio(x):
        return f"{x:.2f}x" if x is not None else "-"

    headers = ["K x N", "M", f"{dense_name} us", "ours us"] + (["ours a8 us"] if a8 else []) + [
        "torch int4 us", f"{dense_name} GB/s", "ours GB/s"] + (["a8 GB/s"] if a8 else []) + [
        "int4 GB/s", "ours vs dense", "ours vs int4"] + (["a8 vs dense", "a8 vs int4"] if a8 else [])
    body = []
    for r in rows:
        body.append(
            [f"{r['K']}x{r['N']}", r["M"], us(r["dense"]), us(r["ours"])] + ([us(r["a8"])] if a8 else [])
            + [us(r["int4"]), gbs(r["dense"]), gbs(r["ours"])] + ([gbs(r["a8"])] if a8 else [])
            + [gbs(r["int4"]), ratio(r["speedup_vs_dense"]), ratio(r["speedup_vs_int4"])]
            + ([ratio(r.get("a8_speedup_vs_dense")), ratio(r.get("a8_speedup_vs_int4"))] if a8 else []))
    return markdown_table(headers, body, align="lr" + "r" * (len(headers) - 2))


def _markdown(payload: dict) -> str:
    m, c = payload["machine"], payload["config"]
    dev = c["device"]
    dense_name = "fp32" if dev == "cpu" else "fp16 (cuBLAS)"
    peer = ("`torch.ops.aten._weight_int4pack_mm_for_cpu` (bf16 activations, weight packed by "
            "`_convert_weight_to_int4pack_for_cpu`)" if dev == "cpu" else
            "`torch.ops.aten._weight_int4pack_mm` (tinygemm, bf16 activations), where this torch build has it")
    commit = m["git_commit"] + (" (uncommitted changes in the tree)" if m.get("git_dirty") else "")
    cpu = m["cpu_model"] + (f" ({m['cpu_family_model']})" if m.get("cpu_family_model") else "")
    simd = ", ".join(m.get("cpu_simd") or []) or "-"
    where = f"{m['gpu']} (CUDA {m['cuda_runtime']}), host CPU {cpu}" if dev == "cuda" else cpu
    facts = [
        f"- date: {m['date']}",
        f"- command: `{c['command_line']}`",
        f"- machine: {where}; {m['cpu_count']} CPUs, torch threads {m['torch_threads']}; SIMD: {simd}",
        f"- load average (1 min) at start / end: {m['load_avg_1m_at_start']:.2f} / {m['load_avg_1m_at_end']:.2f}"
        + (" -- **the machine was busy: these numbers are unreliable**" if m["busy"] else ""),
        f"- torch {m['torch']}, slimformer {m['slimformer']} (CPU kernel: {m['active_cpu_isa']}), commit {commit}",
        f"- config: {c['bits']}-bit, group size {c['group_size']}, ours x {c['x_dtype']}; dense {dense_name}; "
        f"median of up to {c['reps']} reps after {c['warmup']} warm-up calls (per-cell budget {c['budget_s']} s, "
        f"at least {c['min_reps']} reps), variants interleaved; cache {c['cache']}",
    ]
    labels = sorted({(r["K"], r["N"], r["layer"]) for r in payload["rows"] if r["layer"]},
                    key=lambda t: [tuple(s) for s in c["shapes"]].index((t[0], t[1])))
    notes = [
        "Notes:",
        "- us = median microseconds per call; GB/s = weight bytes read per call / median time (dense: K*N*"
        f"{4 if dev == 'cpu' else 2} B; ours: qweight + qzeros + scales; torch int4: packed weight + "
        "scales_and_zeros)." + (" Caches were flushed before every timed call, so weights come from memory."
                                if c["cache"] != "warm" else
                                " Warm caches (--warm-cache): layers that fit in cache can exceed DRAM bandwidth."),
        "- ours vs X = X's time / our time: above 1.00x slimformer is faster.",
        *(["- ours a8 = `slimformer.ops.gptq_gemm_a8` (`QuantLinear(int8_activations=True)`): same weights, x "
           "quantized on the fly to int8 per 32 inputs, integer dot products; relative error vs exact "
           f"{min(errs):.1e} to {max(errs):.1e} in this run (JSON: rel_err_vs_exact)."]
          if (errs := [r["a8"]["rel_err_vs_exact"] for r in payload["rows"] if "rel_err_vs_exact" in r["a8"]])
          else []),
        f"- torch int4 = {peer}, fed the same quantized integers, scales and zeros; x is cast to bf16 before "
        "timing" + (" (its fast path; fp32/fp16 x take a generic path that is over 10x slower)."
                    if dev == "cpu" else "."),
        "- Every row was checked before timing: ours, ours a8 (on its int8-quantized x) and torch int4 against "
        "F.linear on the weight dequantized by the pure-PyTorch reference.",
    ]
    if any(r["int4"].get("skipped") == "n/a (K % group != 0)" for r in payload["rows"]):
        notes.append("- **n/a (K % group != 0)**: torch's int4 kernels require in_features to be a multiple of "
                     "the group size, so SmolLM2's K=576 with group 128 (4.5 groups per row) cannot use them (nor "
                     "can GPTQModel's torch-int4 path); slimformer runs these checkpoints as they are.")
    if labels:
        notes.append("- shapes: " + "; ".join(f"{k}x{n} = {lab}" for k, n, lab in labels) + ".")
    return "\n".join([
        f"# GPTQ kernel benchmark: {dev}, {c['bits']}-bit, group {c['group_size']}" +
        (" (quick)" if c["quick"] else ""), "", *facts, "", payload["table"], "", *notes, ""])


def run(args: argparse.Namespace, log=print) -> dict:
    """Run the benchmark described by parsed ``args``; returns the JSON payload (also written)."""
    a = _resolve(args)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    machine = machine_facts(a.device)
    config = {
        "device": a.device, "bits": a.bits, "group_size": a.group_size, "x_dtype": _DTYPE_NAMES[a.x_dtype],
        "dense_dtype": _DTYPE_NAMES[a.dense_dtype], "shapes": [list(s) for s in a.shapes],
        "batches": list(a.batches), "warmup": a.warmup, "reps": a.reps, "min_reps": a.min_reps,
        "budget_s": a.budget, "seed": a.seed, "quick": a.quick,
        "command_line": getattr(args, "command_line", " ".join(sys.argv)),
    }
    if _busy(a.device, machine):
        log(f"WARNING: load average {machine['load_avg_1m_at_start']:.2f} > {BUSY_LOAD}: other work is running, "
            "timings will be noisy (a 2-thread kernel stalls whenever a core is taken)")
    log(f"slimformer {machine['slimformer']} GPTQ benchmark on {machine['gpu'] or machine['cpu_model']} "
        f"({machine['torch_threads']} threads, CPU kernel {machine['active_cpu_isa']}), torch {machine['torch']}, "
        f"commit {machine['git_commit']}{' (dirty)' if machine['git_dirty'] else ''}")
    rows: list[dict] = []
    torch.manual_seed(a.seed)
    flush = None if a.warm_cache else CacheFlusher(a.device)
    config["cache"] = "warm" if flush is None else f"flushed ({flush.nbytes >> 20} MiB written before each call)"
    with torch.no_grad():
        for K, N in a.shapes:
            rows += _run_shape(a, K, N, dev, flush, log)
            gc.collect()
            if a.device == "cuda":
                torch.cuda.empty_cache()
    machine["load_avg_1m_at_end"] = os.getloadavg()[0]
    # Our own run adds about 1 to the load average by its end; a busy start means other work.
    machine["busy"] = _busy(a.device, machine)
    payload = {"benchmark": "gptq", "machine": machine, "config": config, "rows": rows}
    payload["table"] = _table(rows, a.device)
    tag = "_quick" if a.quick else ("_custom" if a.custom else "")
    publish(f"gptq_{a.device}{tag}", payload, _markdown(payload), Path(a.out), not a.no_write, log)
    return payload


def run_cli(args: argparse.Namespace) -> int:
    return guarded_run(run, args)


def main(argv: Sequence[str] | None = None, prog: str = "bench_gptq") -> int:
    """Stand-alone entry point (``benchmarks/bench_gptq.py``)."""
    return run_cli(parse_command_line(add_arguments, DESCRIPTION, prog, argv))


if __name__ == "__main__":
    sys.exit(main(prog="python -m slimformer.bench.gptq"))
