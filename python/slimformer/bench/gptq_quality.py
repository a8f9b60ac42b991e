"""GPTQ quality benchmark: perplexity of SmolLM2-135M under GPTQ vs round-to-nearest, the protocol
of issue 3, with quantization time, peak memory and decode speed.

Protocol (fixed, so that numbers compare across commits):

- model: SmolLM2-135M-Instruct in fp32 (``slimformer.models.default_model_dir``);
- calibration: 64 random 512-token windows, seed 0, of sensesensibility + mansfieldpark
  (:func:`slimformer.evaluation.calibration_windows`);
- evaluation: perplexity over non-overlapping 512-token windows of the first 65,536 tokens of
  prideprejudice and of emma, each tokenised as one stream, no BOS per window
  (:func:`slimformer.evaluation.perplexity`);
- every setting runs in a fresh process, so its peak RSS is its own.

Run ``slimformer bench gptq-quality`` (all settings, about an hour on 2 cores) or pick some with
``--settings fp32 gptq-4b-g128``. Results go to benchmarks/results/gptq_quality_<date>_<commit>.{json,md}
and are rewritten after every setting, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .common import default_out_dir, machine_facts, markdown_table, write_report

SUMMARY = "GPTQ vs RTN perplexity of SmolLM2-135M (issue 3 protocol), quantize time, memory, decode speed"
DESCRIPTION = __doc__

CALIB_TEXTS = ("sensesensibility", "mansfieldpark")
EVAL_TEXTS = ("prideprejudice", "emma")
# name -> quantize() options (None: the fp32 model). Asymmetric grids throughout, as the RTN
# baselines quoted in issue 3; "speed" settings also time greedy decoding.
SETTINGS: dict[str, dict | None] = {
    "fp32": None,
    "rtn-4b-g128": dict(method="rtn", bits=4, group_size=128),
    "gptq-4b-g128": dict(bits=4, group_size=128),
    "rtn-4b-g-1": dict(method="rtn", bits=4, group_size=-1),
    "gptq-4b-g-1": dict(bits=4, group_size=-1),
    "gptq-4b-g128-act": dict(bits=4, group_size=128, desc_act=True),
    "rtn-3b-g128": dict(method="rtn", bits=3, group_size=128),
    "gptq-3b-g128": dict(bits=3, group_size=128),
    "gptq-3b-g128-act": dict(bits=3, group_size=128, desc_act=True),
    "rtn-2b-g64": dict(method="rtn", bits=2, group_size=64),
    "gptq-2b-g64": dict(bits=2, group_size=64),
    # beyond the paper
    "gptq-3b-g128-act-static": dict(bits=3, group_size=128, desc_act=True, static_groups=True),
    "gptq-3b-g128-n128": dict(bits=3, group_size=128, nsamples=128),
    "gptq-4b-g128-mse": dict(bits=4, group_size=128, mse=2.4),
    "gptq-3b-g128-mse": dict(bits=3, group_size=128, mse=2.4),
    "gptq-3b-g128-act-mse": dict(bits=3, group_size=128, desc_act=True, mse=2.4),
    "gptq-2b-g64-mse": dict(bits=2, group_size=64, mse=2.4),
    "rtn-3b-g128-mse": dict(method="rtn", bits=3, group_size=128, mse=2.4),
}
SPEED_SETTINGS = ("fp32", "gptq-4b-g128")
PROMPT = "Write one sentence about the English countryside."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="NAME",
                   help="settings to run, in order (default: all): " + ", ".join(SETTINGS))
    p.add_argument("--eval-texts", nargs="+", default=list(EVAL_TEXTS), help="texts to evaluate on (default: %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="first N tokens of each text (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows (default: %(default)s)")
    p.add_argument("--model", default="smollm2", help="model directory or 'smollm2' (default)")
    p.add_argument("--text-dir", default=None, help="folder of the .txt files (default: ../shared/data/text)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results in a checkout)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one setting -> JSON file


def _one_setting(name: str, args: argparse.Namespace) -> dict:
    """Load, quantize and evaluate one setting in this process."""
    import torch

    from .. import gptq
    from ..evaluation import (calibration_windows, chat_prompt, find_text_file, generation_speed,
                              model_memory_bytes, perplexity, tokenize_text)
    from ..models import load_model

    options = dict(SETTINGS[name] or {})
    nsamples = options.pop("nsamples", args.nsamples)
    model, tok = load_model(args.model)
    row: dict = {"setting": name, "options": SETTINGS[name], "nsamples": nsamples if SETTINGS[name] else None}
    if options:
        options.setdefault("sym", False)
        calib = calibration_windows([tokenize_text(tok, find_text_file(t, args.text_dir)) for t in CALIB_TEXTS],
                                    nsamples, args.seqlen, seed=0)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        gptq.quantize(model, calib if options.get("method") != "rtn" else None, progress=False, **options)
        row["quantize_s"] = time.perf_counter() - start
        row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["rss_before_quantize_mib"] = rss_before
    row["model_mib"] = model_memory_bytes(model) / 2**20
    for text in args.eval_texts:
        ids = tokenize_text(tok, find_text_file(text, args.text_dir))
        start = time.perf_counter()
        row[f"ppl_{text}"] = perplexity(model, ids, seqlen=args.seqlen, max_tokens=args.eval_tokens, progress=False)
        row[f"eval_s_{text}"] = time.perf_counter() - start
    if name in SPEED_SETTINGS:
        prompt = chat_prompt(tok, PROMPT)
        generation_speed(model, tok, prompt, new_tokens=4)  # warm-up
        speeds = [generation_speed(model, tok, prompt, new_tokens=32) for _ in range(3)]
        row["decode_tokens_per_s"] = sorted(s["decode_tokens_per_s"] for s in speeds)[1]  # median of 3
        row["sample_text"] = speeds[0]["text"]
    return row


def _run_child(name: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "slimformer.bench.gptq_quality", "--child", str(out), "--settings", name,
               "--eval-texts", *args.eval_texts, "--eval-tokens", str(args.eval_tokens), "--seqlen",
               str(args.seqlen), "--nsamples", str(args.nsamples), "--model", args.model]
        if args.text_dir:
            cmd += ["--text-dir", args.text_dir]
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not out.exists():
            return {"setting": name, "error": f"child exited with {proc.returncode}"}
        return json.loads(out.read_text())


def _fmt(v, digits=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if v >= 1e5 else f"{v:.{digits}f}"
    return str(v)


def _markdown(payload: dict) -> str:
    m, cfg, rows = payload["machine"], payload["config"], payload["rows"]
    texts = cfg["eval_texts"]
    headers = ["setting", *[f"ppl {t}" for t in texts], "quantize s", "peak RSS MiB", "model MiB", "decode tok/s"]
    table = [[r["setting"], *[_fmt(r.get(f"ppl_{t}")) for t in texts], _fmt(r.get("quantize_s"), 1),
              _fmt(r.get("peak_rss_mib"), 0), _fmt(r.get("model_mib"), 1), _fmt(r.get("decode_tokens_per_s"), 1)]
             if "error" not in r else [r["setting"], r["error"], *[""] * (len(headers) - 2)] for r in rows]
    lines = [
        "# GPTQ quality: SmolLM2-135M perplexity, GPTQ vs round-to-nearest", "",
        f"- date: {m['date']}; commit {m['git_commit']}{' (dirty)' if m['git_dirty'] else ''}",
        f"- machine: {m['cpu_model']}, {m['torch_threads']} threads, torch {m['torch']}, CPU kernel {m['active_cpu_isa']}",
        f"- calibration: {cfg['nsamples']} random {cfg['seqlen']}-token windows (seed 0) of {' + '.join(CALIB_TEXTS)}",
        f"- evaluation: non-overlapping {cfg['seqlen']}-token windows of the first {cfg['eval_tokens']} tokens of "
        f"{', '.join(texts)}; one stream, no BOS per window",
        "- grids: asymmetric (sym=False), format gptq (v1); `-act` = act-order (desc_act), `-static` = static groups,"
        " `-n128` = 128 calibration windows, `-mse` = clipping-range search (mse=2.4)", "",
        markdown_table(headers, table, "l" + "r" * (len(headers) - 1)), "",
        "- quantize s: wall time of slimformer.gptq.quantize (model already loaded); peak RSS: the process's"
        " maximum resident memory by the end of quantization (model + calibration + one block's work).",
        "- decode tok/s: greedy decoding of 32 new tokens after a chat prompt, batch 1, median of 3, KV cache.",
    ]
    for r in rows:
        if r.get("sample_text"):
            lines.append(f"- sample ({r['setting']}): {r['sample_text'].strip()!r}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, log=print) -> dict:
    machine = machine_facts("cpu")
    config = {"settings": args.settings, "eval_texts": args.eval_texts, "eval_tokens": args.eval_tokens,
              "seqlen": args.seqlen, "nsamples": args.nsamples, "model": args.model,
              "command_line": getattr(args, "command_line", " ".join(sys.argv))}
    payload = {"benchmark": "gptq_quality", "machine": machine, "config": config, "rows": []}
    commit = machine["git_commit"] + ("-dirty" if machine["git_dirty"] else "")
    stem = f"gptq_quality_{_dt.date.today().isoformat()}_{commit}"
    out = Path(args.out) if args.out else default_out_dir()
    for name in args.settings:
        log(f"== {name}")
        start = time.perf_counter()
        row = _run_child(name, args)
        log(f"   {json.dumps({k: v for k, v in row.items() if k != 'sample_text'})} ({time.perf_counter() - start:.0f} s)")
        payload["rows"].append(row)
        write_report(out, stem, "gptq_quality_latest", payload, _markdown(payload))
    log(_markdown(payload))
    return payload


def run_cli(args: argparse.Namespace) -> int:
    run(args)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m slimformer.bench.gptq_quality") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.child:
        row = _one_setting(args.settings[0], args)
        Path(args.child).write_text(json.dumps(row))
        return 0
    args.command_line = f"{prog} {' '.join(argv)}".strip()
    return run_cli(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
