"""The ``slimformer`` command line.

::

    slimformer info                      what this build contains and what this machine runs
    slimformer bench gptq [options]      GPTQ kernel vs torch dense and torch int4 (see --help)
    slimformer bench binary [options]    1-bit weight kernels vs torch dense (see --help)
    slimformer bench binary-quality      binarized all-MiniLM-L6-v2 vs fp32: post-training vs distilled
    slimformer quantize MODEL --calib FILE... --out DIR [options]   GPTQ/RTN-quantize a model, save it
    slimformer eval MODEL --text FILE [options]                     perplexity, decode speed, memory
    slimformer demo [options]            SmolLM2-135M: fp32 vs GPTQ 4-bit, end to end (< 10 min on 2 cores)

MODEL is ``smollm2`` (the default model, see :mod:`slimformer.models`), a local Hugging Face
causal-LM directory, or (for ``eval``) a GPTQ checkpoint directory.

Adding a command: write ``_add_<name>(subparsers)`` that creates its parser and sets
``func=<callable(args) -> int>`` with ``set_defaults``, and append it to ``_COMMANDS``. Commands
import their heavy modules inside ``func`` so that ``slimformer --help`` stays fast. A command
group with its own subcommands (like ``bench``) adds a nested subparser set; a new benchmark is a
module of :mod:`slimformer.bench` named in ``_BENCHMARKS``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence


def _run_info(args: argparse.Namespace) -> int:
    from .info import main as info_main

    info_main()
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show what this slimformer build contains and what this machine runs",
                       description="Show the slimformer build (compiled CPU ISAs, CUDA archs, torch "
                                   "version) and this machine's runtime facts.")
    p.set_defaults(func=_run_info)


# -- bench ------------------------------------------------------------------------------------
# command name -> module in slimformer.bench (each has SUMMARY, DESCRIPTION, add_arguments, run_cli)
_BENCHMARKS = {"gptq": "gptq", "gptq-quality": "gptq_quality", "binary": "binary", "binary-quality": "binary_quality",
               "sparse": "sparse", "sparse-quality": "sparse_quality", "tome": "tome", "tome-quality": "tome_quality"}


def _fill_bench(p: argparse.ArgumentParser) -> None:
    import importlib

    bsub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module in _BENCHMARKS.items():
        bench = importlib.import_module(f".bench.{module}", __package__)
        b = bsub.add_parser(name, help=bench.SUMMARY, description=bench.DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        bench.add_arguments(b)
        b.set_defaults(func=bench.run_cli)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a kernel benchmark (writes JSON + markdown results)",
                       description="Kernel benchmarks: warm-up, median of reps, side by side with the "
                                   "torch baselines in the same run.")
    _fill_bench(p)


# -- quantize, eval, demo --------------------------------------------------------------------
def _user_error(prog: str, e: Exception) -> int:
    """Print what is wrong (no traceback) and return exit code 2."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def _peak_rss_mib() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A markdown table with padded columns."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _gptq_api():
    """slimformer.gptq.quantize/save/load, or a RuntimeError saying they are not in this build."""
    from . import gptq

    missing = [n for n in ("quantize", "save", "load") if not hasattr(gptq, n)]
    if missing:
        raise RuntimeError(f"this slimformer build has no slimformer.gptq.{'/'.join(missing)} yet")
    return gptq


def _run_quantize(args: argparse.Namespace) -> int:
    import time

    from .evaluation import calibration_windows, tokenize_text
    from .models import ModelPackageMissing, load_model

    prog = "slimformer quantize"
    if args.method == "gptq" and not args.calib:
        return _user_error(prog, "--method gptq needs calibration text: --calib FILE [FILE ...] (or use --method rtn)")
    try:
        gptq = _gptq_api()
        start = time.perf_counter()
        model, tokenizer = load_model(args.model)
        examples = None
        if args.method == "gptq":
            streams = [tokenize_text(tokenizer, Path(f)) for f in args.calib]
            examples = calibration_windows(streams, args.nsamples, args.seqlen, args.seed)
            print(f"calibration: {args.nsamples} windows x {args.seqlen} tokens (seed {args.seed}) from "
                  f"{sum(s.numel() for s in streams)} tokens of {', '.join(Path(f).name for f in args.calib)}", flush=True)
    except (FileNotFoundError, ModelPackageMissing, RuntimeError, ValueError) as e:
        return _user_error(prog, e)
    gptq.quantize(model, examples, bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=args.sym,
                  damp_percent=args.damp_percent, static_groups=args.static_groups, method=args.method,
                  true_sequential=args.true_sequential, mse=args.mse, lm_head=args.lm_head,
                  checkpoint_format=args.checkpoint_format)
    gptq.save(model, args.out, tokenizer=tokenizer)
    print(f"saved {args.method} {args.bits}-bit g{args.group_size} checkpoint to {args.out}")
    print(f"wall time {time.perf_counter() - start:.1f} s, peak RSS {_peak_rss_mib():.0f} MiB")
    return 0


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with GPTQ (or RTN) and save a GPTQ checkpoint",
                       description="Load MODEL, draw calibration windows from the --calib texts "
                                   "(slimformer.evaluation.calibration_windows), quantize the linear layers "
                                   "of its transformer blocks in place and save a GPTQ checkpoint to --out.")
    p.add_argument("model", metavar="MODEL", help="'smollm2' or a local Hugging Face causal-LM directory")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="inputs per quantization group; -1: one per row")
    p.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by decreasing Hessian diagonal")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (per-group zero point)")
    p.add_argument("--static-groups", action="store_true", help="fix every group's grid before solving")
    p.add_argument("--damp-percent", type=float, default=0.01, help="Hessian damping, fraction of its mean diagonal")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="calibrate all layers of a block on the full-precision block's inputs at once")
    p.add_argument("--mse", type=float, default=0.0, metavar="P",
                   help="search each group's clipping range for the least sum |w-q|^P (2.4 is the GPTQ "
                        "reference's); default 0: min/max ranges")
    p.add_argument("--lm-head", action="store_true", help="also quantize the output layer (lm_head)")
    p.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], default="gptq",
                   help="zero-point storage: gptq (v1, read by most loaders; default) or gptq_v2")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="rtn: round-to-nearest baseline, no calibration")
    p.add_argument("--calib", nargs="+", metavar="TEXTFILE", help="calibration text file(s)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the window draw")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="checkpoint directory to write")
    p.set_defaults(func=_run_quantize)


def _measure(model, tokenizer, test_tokens, args, prompt: str | None) -> dict:
    """Perplexity, generation and memory of one model (the rows of eval's and demo's tables)."""
    import time

    from .evaluation import generation_speed, model_memory_bytes, perplexity

    start = time.perf_counter()
    result = {"ppl": perplexity(model, test_tokens, seqlen=args.seqlen, max_tokens=args.max_tokens,
                                batch_size=args.batch_size),
              "ppl_s": time.perf_counter() - start, "memory": model_memory_bytes(model)}
    if prompt is not None:
        result["gen"] = generation_speed(model, tokenizer, prompt, new_tokens=args.new_tokens)
    return result


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluation import chat_prompt, tokenize_text
    from .models import ModelPackageMissing, load_model

    try:
        model, tokenizer = load_model(args.model)
        tokens = tokenize_text(tokenizer, Path(args.text))
    except (FileNotFoundError, ModelPackageMissing, RuntimeError) as e:
        return _user_error("slimformer eval", e)
    used = tokens.numel() if args.max_tokens is None else min(args.max_tokens, tokens.numel())
    windows = used // args.seqlen
    prompt = None if args.no_speed else chat_prompt(tokenizer, args.prompt)
    r = _measure(model, tokenizer, tokens, args, prompt)
    rows = [("model", args.model),
            ("perplexity", f"{r['ppl']:.3f}"),
            ("text", f"{Path(args.text).name}: {windows} windows x {args.seqlen} tokens (of {tokens.numel()})"),
            ("perplexity time", f"{r['ppl_s']:.1f} s"),
            ("model memory", _mib(r["memory"]))]
    if prompt is not None:
        g = r["gen"]
        rows += [("decode speed", f"{g['decode_tokens_per_s']:.1f} tokens/s ({g['new_tokens']} greedy tokens, "
                                  f"prefill {g['prefill_s']:.2f} s)"),
                 ("generated", repr(g["text"]))]
    print(_table(rows, ["metric", "value"]))
    return 0


def _add_measure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqlen", type=int, default=512, help="tokens per perplexity (and demo calibration) window")
    p.add_argument("--batch-size", type=int, default=1, help="perplexity windows per forward")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated for the speed test")
    p.add_argument("--prompt", default="Describe Mr. Darcy from Pride and Prejudice in one sentence.",
                   help="user message of the generation test (put in the chat template if there is one)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, decode tokens/s and memory of a model or GPTQ checkpoint",
                       description="Perplexity on non-overlapping windows of --text (the GPTQ paper's "
                                   "protocol, slimformer.evaluation.perplexity), greedy decode speed, memory.")
    p.add_argument("model", metavar="MODEL_OR_GPTQ_DIR", help="'smollm2', an HF directory or a GPTQ checkpoint")
    p.add_argument("--text", required=True, metavar="FILE", help="evaluation text file")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    p.add_argument("--no-speed", action="store_true", help="skip the generation speed test")
    _add_measure_options(p)
    p.set_defaults(func=_run_eval)


def _run_demo(args: argparse.Namespace) -> int:  # noqa: PLR0915 (a linear script)
    import time

    import torch

    from .evaluation import calibration_windows, chat_prompt, find_text_file, generation_speed, tokenize_text
    from .models import ModelPackageMissing, load_model

    prog = "slimformer demo"
    start = time.perf_counter()
    step = lambda msg: print(f"\n[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731
    try:
        step(f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'}")
        model, tokenizer = load_model(args.model or "smollm2")
        texts = {n: find_text_file(n, args.text_dir) for n in ("prideprejudice", "sensesensibility", "mansfieldpark")}
        gptq = _gptq_api()
    except ModelPackageMissing as e:
        print(f"{prog}: {e}\nWith --model DIR the demo runs on any local Hugging Face causal-LM directory.",
              file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError) as e:
        return _user_error(prog, e)

    step("tokenizing the texts")
    test = tokenize_text(tokenizer, texts["prideprejudice"])
    calib = calibration_windows([tokenize_text(tokenizer, texts[n]) for n in ("sensesensibility", "mansfieldpark")],
                                args.nsamples, args.seqlen, seed=0)
    prompt = chat_prompt(tokenizer, args.prompt)
    step(f"fp32: perplexity on the first {args.max_tokens} tokens of prideprejudice ({args.seqlen}-token windows)")
    before = _measure(model, tokenizer, test, args, prompt)
    print(f"fp32 perplexity {before['ppl']:.3f}; says: {before['gen']['text']!r}")

    step(f"GPTQ {args.bits}-bit, group size {args.group_size}, on {args.nsamples} windows x {args.seqlen} tokens "
         "of sensesensibility + mansfieldpark")
    gptq.quantize(model, calib, bits=args.bits, group_size=args.group_size)
    step("GPTQ model: perplexity")
    after = _measure(model, tokenizer, test, args, prompt)
    print(f"GPTQ perplexity {after['ppl']:.3f}; says: {after['gen']['text']!r}")

    step(f"saving the checkpoint to {args.out} and loading it back with slimformer.gptq.load")
    gptq.save(model, args.out, tokenizer=tokenizer)
    reloaded = gptq.load(args.out)
    probe = test[: args.seqlen].unsqueeze(0)
    with torch.inference_mode():
        diff = float((reloaded(probe).logits - model(probe).logits).abs().max())
    again = generation_speed(reloaded, tokenizer, prompt, new_tokens=args.new_tokens)["text"]
    print(f"reloaded: max |logit difference| on one window {diff:.2e}; greedy text "
          f"{'identical' if again == after['gen']['text'] else 'DIFFERENT: ' + repr(again)}")

    rows = [(name, f"{r['ppl']:.3f}", f"{r['gen']['decode_tokens_per_s']:.1f}", _mib(r["memory"]))
            for name, r in (("fp32", before), (f"GPTQ {args.bits}-bit g{args.group_size}", after))]
    print(f"\n{_table(rows, ['model', 'perplexity', 'decode tokens/s', 'model memory'])}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s, peak RSS {_peak_rss_mib():.0f} MiB; "
          f"checkpoint in {args.out} (try: slimformer eval {args.out} --text {texts['prideprejudice']})")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="SmolLM2-135M end to end: fp32 vs GPTQ 4-bit perplexity, speed, memory",
                       description="Load the default model (or --model), measure perplexity on Pride and "
                                   "Prejudice, quantize with GPTQ on Sense and Sensibility + Mansfield Park, "
                                   "measure again, generate with both, save the checkpoint and load it back.")
    p.add_argument("--model", default=None, metavar="DIR", help="a local HF causal-LM directory (default: SmolLM2-135M)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--eval-tokens", dest="max_tokens", type=int, default=16384, metavar="N",
                   help="perplexity on the first N tokens of prideprejudice")
    p.add_argument("--out", default="smollm2-gptq-4bit", metavar="DIR", help="where the checkpoint is saved")
    p.add_argument("--text-dir", default=None, metavar="DIR",
                   help="folder with prideprejudice.txt etc. (default: $SLIMFORMER_DATA or ../shared/data/text)")
    _add_measure_options(p)
    p.set_defaults(func=_run_demo)


_COMMANDS: list[Callable] = [_add_info, _add_bench, _add_quantize, _add_eval, _add_demo]


def build_parser(prog: str = "slimformer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="slimformer: make pre-trained transformers smaller and faster in place.")
    try:
        from . import __version__ as version
    except Exception:  # noqa: BLE001 (a broken build should still print --help)
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def _dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None, prog: str) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = f"{prog} {shlex.join(argv)}".strip()
    return int(args.func(args) or 0)


def main(argv: Sequence[str] | None = None, prog: str = "slimformer") -> int:
    """Entry point of the ``slimformer`` console script (and ``python -m slimformer``)."""
    return _dispatch(build_parser(prog), argv, prog)


def bench_main(argv: Sequence[str] | None = None, prog: str = "slimformer bench") -> int:
    """``python -m slimformer.bench``: the ``bench`` command group on its own."""
    parser = argparse.ArgumentParser(prog=prog, description="slimformer kernel benchmarks.")
    _fill_bench(parser)
    return _dispatch(parser, argv, prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m slimformer.cli"))
