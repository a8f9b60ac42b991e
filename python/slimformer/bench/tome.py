"""Token merging (ToMe) speed: images/s of Hugging Face ViT-B/16 and DeiT-S with ``slimformer.tome``
vs the unpatched model, and the per-layer cost of matching + merging vs the work it saves.

Throughput (per model and batch, one model built once, random weights, eval, inference_mode):

- models: ViT-B/16 at 224 (``ViTForImageClassification(ViTConfig(num_labels=1000))``: hidden 768,
  12 layers, 12 heads, 197 tokens) and DeiT-S (``DeiTForImageClassificationWithTeacher``, hidden
  384, 6 heads, 12 layers, MLP 1536, 198 tokens with the distillation token), the model's own
  attention (SDPA).
- gate, before any timing: with ``slimformer.tome.apply(model, r=0)`` the encoder output must be
  bit-identical to the unpatched model's, and with every r > 0 it must be finite.
- rounds: each round times one unpatched forward, then applies token merging and times one forward
  per r (``model.tome.r = r``; the order of the r values rotates from round to round), then removes
  it; one untimed warm-up round first. Reported: median per forward, images/s, speed-up over the
  unpatched model of the same run, and the ideal speed-up: the model's FLOPs (patch embedding,
  QKV/attention/output/MLP matmuls of every layer with the tokens ``model.tome.tokens_per_layer``
  says it ran on -- attention on the tokens entering a layer, MLP on the tokens left after that
  layer's merge -- and the classifier) unpatched / patched, the merging itself counted as free.
- for context: the speed-ups of the original ToMe (its timm patch) measured on this machine.

Overhead (``--parts overhead``): for one patched forward at ``--overhead-r``, the input of every
layer (hidden states, token sizes, source map) is captured; per layer it then times, interleaved:

- ours: what a patched layer adds between attention and MLP, the steps of ``ToMeState.merge``: the
  metric (keys averaged over heads), the protected tokens, roles and the check of r,
  ``slimformer.ops.tome_match``, ``slimformer.ops.tome_merge``, the source map update, and the
  log(size) attention bias of the next layer;
- torch ops: the same matching + merging with plain torch ops, the way the original ToMe does it
  (normalised metric, scores = a @ b^T over the alternate split, max/argmax, argsort, gather,
  scatter_reduce of x * size and of size, divide), same metric, same source map bookkeeping;
- the layer (attention + MLP, unpatched) on n and on n - r tokens: the difference is what the r
  merged tokens cost in every later layer.

Use ``slimformer bench tome --help`` for the options.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .common import (KernelMismatch, _timer, fmt_us, guarded_run, is_busy, machine_facts, markdown_table,
                     parse_command_line, publish, rel_err)

SUMMARY = "token merging: ViT-B/16 and DeiT-S images/s vs unpatched, per-layer merge overhead"
DESCRIPTION = __doc__.split("Use ``slimformer")[0].replace("``", "")

MODELS = ("vit-b16", "deit-s")
DEFAULT_BATCHES = [8, 32]
DEFAULT_RS = [0, 8, 13, 16]
QUICK_BATCHES = [8]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Original ToMe (its timm patch), speed-up over unpatched timm, measured on this machine (2 cores, fp32).
TOME_TIMM_REFERENCE = {("vit-b16", 32): {8: 1.17, 13: 1.39, 16: 1.63},
                       ("vit-b16", 8): {8: 0.91, 13: 1.02, 16: 1.12},
                       ("deit-s", 8): {13: 0.61}}


def _ints0(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list integers >= 0")
    return values


def _positive(text: str) -> list[int]:
    values = _ints0(text)
    if any(v == 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(MODELS), help="subset of " + ",".join(MODELS) + " (default both)")
    p.add_argument("--batches", type=_positive, default=None, metavar="B[,B...]",
                   help="batch sizes (default 8,32; quick 8)")
    p.add_argument("--rs", type=_ints0, default=None, metavar="R[,R...]",
                   help="tokens merged per layer (default 0,8,13,16); r = 0 must equal the unpatched model")
    p.add_argument("--parts", default="throughput,overhead", help="throughput, overhead or both (default)")
    p.add_argument("--overhead-r", type=int, default=16, help="r of the per-layer overhead breakdown (default 16)")
    p.add_argument("--mode", default="tome", choices=("tome", "zero-tprune"), help="model.tome.mode (default tome)")
    p.add_argument("--no-prop-attn", dest="prop_attn", action="store_false", help="proportional attention off")
    p.add_argument("--unmerge", action="store_true",
                   help="expand the encoder output back to the input tokens (off: the classifier reads CLS, "
                        "as in the original ToMe)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="default fp32 on CPU, fp16 on CUDA")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per model and batch (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: torch's)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the 1-minute load average to drop below 0.5 before starting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="batch 8 only, 2 rounds")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="results folder (default benchmarks/results)")
    p.add_argument("--no-write", action="store_true", help="print the tables only")


# -- models and FLOPs ---------------------------------------------------------------------------
def build_model(name: str, device: str, dtype: torch.dtype, seed: int):
    """(model, encoder) with random weights, eval mode; ``encoder`` is the base model (ViTModel /
    DeiTModel) whose ``last_hidden_state`` the r = 0 gate compares."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    if name == "vit-b16":
        model = ViTForImageClassification(ViTConfig(num_labels=1000))
        encoder = model.vit
    elif name == "deit-s":
        model = DeiTForImageClassificationWithTeacher(
            DeiTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_labels=1000))
        encoder = model.deit
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {','.join(MODELS)}")
    model = model.eval().to(device=device, dtype=dtype)
    return model, encoder


def model_flops(config, tokens: Sequence[int], heads: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one image: patch embedding, per layer QKV + scores +
    attention x V + output projection on ``tokens[l]`` tokens and the MLP on ``tokens[l + 1]``
    (token merging runs between attention and MLP), and ``heads`` classifier heads on one token."""
    D, inner = config.hidden_size, config.intermediate_size
    patches = (config.image_size // config.patch_size) ** 2
    flops = 2.0 * patches * config.num_channels * config.patch_size ** 2 * D
    for n, m in zip(tokens[:-1], tokens[1:]):
        flops += 2.0 * (4 * n * D * D + 2 * n * n * D + 2 * m * D * inner)
    return flops + 2.0 * heads * D * config.num_labels


# tokens that never merge (slimformer.tome's defaults: CLS; DeiT: CLS and the distillation token)
PROTECTED = {"vit-b16": (0,), "deit-s": (0, 1)}


def _classifier_heads(name: str) -> int:
    return 2 if name == "deit-s" else 1


# -- throughput ------------------------------------------------------------------------------------
class _CpuShare:
    """Share of the torch threads' time this process got while a cell ran: CPU seconds (user + system)
    / (wall seconds x torch threads). Near 1 (a little less for the serial parts) on a quiet machine;
    clearly lower when another job competed for the cores (CPU runs only)."""

    def __init__(self):
        import resource

        self._usage = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        self.wall0, self.cpu0, self.load0 = time.perf_counter(), self._usage(), os.getloadavg()[0]

    def result(self) -> dict:
        wall = time.perf_counter() - self.wall0
        return {"seconds": wall, "cpu_share": (self._usage() - self.cpu0) / max(wall * torch.get_num_threads(), 1e-9),
                "load_avg_1m_start": self.load0, "load_avg_1m_end": os.getloadavg()[0]}


def _tome():
    try:
        import slimformer.tome as tome

        tome.apply, tome.remove  # noqa: B018 (fails while the patching module is missing)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"slimformer.tome.apply/remove are not available: {e}") from None
    return tome


def _gate(args, model, encoder, x, log) -> dict:
    """r = 0 must reproduce the unpatched encoder output bit for bit (on the first 4 images; the
    timed forwards check that every r > 0 gives finite logits)."""
    tome = _tome()
    x = x[:4]
    with torch.inference_mode():
        ref = encoder(pixel_values=x).last_hidden_state
        tome.apply(model, r=0, prop_attn=args.prop_attn, mode=args.mode, unmerge=True)
        try:
            out0 = encoder(pixel_values=x).last_hidden_state
        finally:
            tome.remove(model)
    if not torch.equal(out0, ref):
        raise KernelMismatch(f"r = 0 output differs from the unpatched model: relative error "
                             f"{rel_err(out0, ref):.3g} (must be bit-identical)")
    log("    gate: r = 0 bit-identical to the unpatched model")
    return {"r0_bit_identical": True}


def _throughput_cell(args, name: str, batch: int, timer, log) -> list[dict]:
    tome = _tome()
    dev, dtype = torch.device(args.device), args.dtype_t
    model, encoder = build_model(name, args.device, dtype, args.seed)
    cfg = model.config
    x = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, device=dev, dtype=dtype)
    log(f"  {name} batch {batch}")
    checks = _gate(args, model, encoder, x, log)

    def forward():
        return model(pixel_values=x).logits

    samples = {"hf": [], **{r: [] for r in args.rs}}
    tokens: dict[int, list[int]] = {}
    share = _CpuShare()
    with torch.inference_mode():
        for rnd in range(args.warmup + args.rounds):
            timed = rnd >= args.warmup
            t = timer(forward)
            if timed:
                samples["hf"].append(t)
            tome.apply(model, r=args.rs[0], prop_attn=args.prop_attn, mode=args.mode, unmerge=args.unmerge)
            k = rnd % len(args.rs)
            for r in args.rs[k:] + args.rs[:k]:
                model.tome.r = r
                if rnd == 0:  # untimed: the patched output must be finite
                    logits = forward()
                    if not bool(torch.isfinite(logits).all()):
                        raise KernelMismatch(f"{name} batch {batch} r = {r}: the patched model's logits are not finite")
                    checks[f"r{r}_finite"] = True
                t = timer(forward)
                tokens[r] = list(model.tome.tokens_per_layer)
                if timed:
                    samples[r].append(t)
            tome.remove(model)
    cell = share.result()
    import statistics

    med = {k: statistics.median(v) for k, v in samples.items()}
    base_tokens = [tokens[args.rs[0]][0]] * (cfg.num_hidden_layers + 1)
    heads = _classifier_heads(name)
    base_flops = model_flops(cfg, base_tokens, heads)
    ref = TOME_TIMM_REFERENCE.get((name, batch), {})
    rows = []
    for r in args.rs:
        flops = model_flops(cfg, tokens[r], heads)
        speedup = med["hf"] / med[r]
        ideal = base_flops / flops
        rows.append({
            "model": name, "batch": batch, "r": r, "tokens_per_layer": tokens[r], "final_tokens": tokens[r][-1],
            "hf_ms": med["hf"] * 1e3, "tome_ms": med[r] * 1e3,
            "hf_img_s": batch / med["hf"], "tome_img_s": batch / med[r],
            "speedup": speedup, "ideal_speedup": ideal, "gflops_per_image": flops / 1e9,
            "hf_gflops_per_image": base_flops / 1e9, "timm_tome_reference": ref.get(r),
            "hf_samples_ms": [s * 1e3 for s in samples["hf"]], "tome_samples_ms": [s * 1e3 for s in samples[r]],
            "checks": checks, "cell": cell})
        log(f"    r={r:<3} tokens {tokens[r][0]}->{tokens[r][-1]:<4} hf {med['hf'] * 1e3:8.1f} ms  "
            f"tome {med[r] * 1e3:8.1f} ms  {batch / med[r]:7.2f} img/s  {speedup:.2f}x (ideal {ideal:.2f}x"
            + (f", timm ToMe {ref[r]:.2f}x" if r in ref else "") + ")")
    log(f"    ({cell['seconds']:.0f} s, CPU share {cell['cpu_share']:.2f})")
    return rows


# -- overhead ---------------------------------------------------------------------------------------
def _capture_layer_inputs(model, stack, x) -> list[dict]:
    """Run the patched model once; per layer: its input hidden states and the token sizes and source
    map that the merge state holds when the layer starts."""
    captured = []

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        state = model.tome
        index = len(captured)
        captured.append({
            "x": hidden.detach().clone(),
            # layer 0 resets the state in its forward: nothing has merged yet
            "sizes": None if index == 0 or state.sizes is None else state.sizes.detach().clone(),
            "source": None if index == 0 or state.source is None else state.source.detach().clone()})

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in stack]
    try:
        with torch.inference_mode():
            model(pixel_values=x)
    finally:
        for h in handles:
            h.remove()
    return captured


def _head_avg_key(layer) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The key projection averaged over heads (the metric ``slimformer.tome`` uses), and the heads."""
    attn = layer.attention
    key = next(m for n, m in attn.named_modules() if n.split(".")[-1] in ("k_proj", "key")
               and isinstance(m, torch.nn.Linear))
    heads = attn.config.num_attention_heads
    w = key.weight.detach().view(heads, -1, key.weight.shape[1]).mean(0)
    b = None if key.bias is None else key.bias.detach().view(heads, -1).mean(0)
    return w, b, heads


def torch_ops_merge(metric: torch.Tensor, x: torch.Tensor, sizes: torch.Tensor, protected: torch.Tensor, r: int,
                    source: torch.Tensor | None):
    """Bipartite soft matching + size-weighted merge with plain torch ops, as the original ToMe does
    it (a baseline for timing, written for this benchmark). Tokens 0, 2, 4, ... are sources, 1, 3,
    ... destinations; protected tokens neither merge nor receive. Output order: the unmerged
    sources (in order), then the destinations. Returns (x, sizes, source map of the input tokens)."""
    B, n, D = x.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, 0::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores = scores.masked_fill(protected[:, 0::2, None] | protected[:, None, 1::2], float("-inf"))
    best, best_dst = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src_idx, unm_idx = order[:, :r], order[:, r:].sort(dim=-1).values  # unmerged keep their order (CLS first)
    dst_idx = best_dst.gather(1, src_idx)
    n_a, n_unm = a.shape[1], a.shape[1] - r

    def merge(t: torch.Tensor) -> torch.Tensor:  # t [B, n, c]: summed into the destinations
        c = t.shape[-1]
        src, dst = t[:, 0::2], t[:, 1::2]
        unm = src.gather(1, unm_idx[..., None].expand(B, n_unm, c))
        moved = src.gather(1, src_idx[..., None].expand(B, r, c))
        dst = dst.scatter_reduce(1, dst_idx[..., None].expand(B, r, c), moved, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    s = sizes[..., None].to(x.dtype)
    out = merge(x * s)
    out_sizes = merge(s)
    out = out / out_sizes
    # where each input token went: unmerged source k -> k, merged source -> n_unm + its destination,
    # destination j -> n_unm + j
    where_a = torch.empty(B, n_a, dtype=torch.long, device=x.device)
    where_a.scatter_(1, unm_idx, torch.arange(n_unm, device=x.device).expand(B, n_unm))
    where_a.scatter_(1, src_idx, n_unm + dst_idx)
    where = torch.empty(B, n, dtype=torch.long, device=x.device)
    where[:, 0::2] = where_a
    where[:, 1::2] = n_unm + torch.arange(n - n_a, device=x.device)
    new_source = where if source is None else where.gather(1, source)
    return out, out_sizes[..., 0].float(), new_source


def _overhead_cell(args, name: str, batch: int, timer, log) -> dict:
    from .. import ops
    from ..tome.reference import ROLE_SOURCE, alternate_roles, merge_reference, unmerge

    tome = _tome()
    dev, dtype = torch.device(args.device), args.dtype_t
    model, encoder = build_model(name, args.device, dtype, args.seed)
    cfg = model.config
    x = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, device=dev, dtype=dtype)
    stack = next(m for m in encoder.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
                 and type(m[0]).__name__ in ("ViTLayer", "DeiTLayer"))
    protect = PROTECTED[name]
    tome.apply(model, r=args.overhead_r, prop_attn=args.prop_attn, mode="tome", unmerge=args.unmerge)
    captured = _capture_layer_inputs(model, stack, x)
    tokens = list(model.tome.tokens_per_layer)
    tome.remove(model)
    N0 = tokens[0]
    log(f"  overhead: {name} batch {batch} r={args.overhead_r}: tokens per layer {tokens}")
    rows, share = [], _CpuShare()
    with torch.inference_mode():
        for index, (layer, cap) in enumerate(zip(stack, captured)):
            n, r = tokens[index], tokens[index] - tokens[index + 1]
            if r == 0:
                continue
            w_avg, b_avg, _ = _head_avg_key(layer)
            h_in = cap["x"]
            sizes = cap["sizes"] if cap["sizes"] is not None else torch.ones(batch, n, device=dev)
            source = cap["source"]
            h = layer.layernorm_before(h_in)
            bias = sizes.log()[:, None, None, :].to(dtype) if args.prop_attn and index > 0 else None
            x_mid = h_in + layer.attention(h, bias)[0]  # the tensor a patched layer merges
            prot_idx = torch.tensor(protect, device=dev).expand(batch, -1)

            def protected_mask():
                where = prot_idx if source is None else source.gather(1, prot_idx)
                return torch.zeros(batch, n, dtype=torch.bool, device=dev).scatter_(1, where, True)

            def ours_match():  # as slimformer.tome's ToMeState.merge does it (unpadded input)
                metric = F.linear(h, w_avg, b_avg)
                roles = alternate_roles(batch, n, protected_mask(), device=dev)
                if r > int((roles == ROLE_SOURCE).sum(1).min()):  # the per-layer check of r (a host sync)
                    raise RuntimeError("r larger than the sources")
                return ops.tome_match(metric, sizes, roles, r)

            def ours():
                slot = ours_match().slot
                out, out_sizes = ops.tome_merge(x_mid, sizes, slot, n - r)
                new_source = slot if source is None else slot.gather(1, source)
                bias = out_sizes.log()[:, None, None, :]
                return out, out_sizes, new_source, bias

            def torch_ops():
                metric = F.linear(h, w_avg, b_avg)
                out, out_sizes, new_source = torch_ops_merge(metric, x_mid, sizes, protected_mask(), r, source)
                bias = out_sizes.log()[:, None, None, :]
                return out, out_sizes, new_source, bias

            x_short = h_in[:, : n - r].contiguous()

            def layer_split():  # the patched layer without the merge: attention on n, MLP on n - r tokens
                y = h_in + layer.attention(layer.layernorm_before(h_in), bias)[0]
                y = y[:, : n - r]
                return y + layer.mlp(layer.layernorm_after(y))

            fns: dict[str, Callable[[], object]] = {
                "metric": lambda: F.linear(h, w_avg, b_avg), "ours": ours, "ours_match": ours_match,
                "torch_ops": torch_ops,
                "layer_n": lambda: layer(h_in), "layer_n_minus_r": lambda: layer(x_short), "layer_split": layer_split}

            # correctness: our merge against the fp64 reference on our slots (must hold); both
            # pipelines unmerged to the input tokens (agree unless near-tied scores rank differently)
            o_out, o_sizes, o_src, _ = ours()
            slot = ours_match().slot
            ref_out, ref_sizes = merge_reference(x_mid, sizes, slot, n - r)
            err = rel_err(o_out, ref_out)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            if not err <= tol:
                raise KernelMismatch(f"tome_merge is WRONG at {name} layer {index}: relative error {err:.3g} vs the "
                                     f"fp64 reference > {tol:g}")
            t_out, t_sizes, t_src, _ = torch_ops()
            o_full, t_full = unmerge(o_out, o_src), unmerge(t_out, t_src)  # both back to the input tokens
            row_err = ((o_full.double() - t_full.double()).norm(dim=(1, 2))
                       / t_full.double().norm(dim=(1, 2)).clamp_min(1e-30))
            tol_rows = 1e-4 if dtype == torch.float32 else 1e-2
            agree = float((row_err <= tol_rows).float().mean())

            times = _time_round_robin(fns, timer, args.warmup, args.rounds)
            med = {k: v * 1e6 for k, v in times.items()}
            saved = med["layer_n"] - med["layer_n_minus_r"]
            rows.append({"layer": index, "tokens_in": n, "r": r, "ours_us": med["ours"], "metric_us": med["metric"],
                         "ours_match_us": med["ours_match"], "ours_merge_us": med["ours"] - med["ours_match"],
                         "torch_ops_us": med["torch_ops"], "layer_n_us": med["layer_n"],
                         "layer_n_minus_r_us": med["layer_n_minus_r"], "saved_per_later_layer_us": saved,
                         "layer_split_us": med["layer_split"],
                         "later_layers": len(stack) - 1 - index,
                         "merge_rel_err_vs_reference": err, "rows_agreeing_with_torch_ops": agree,
                         "max_row_diff_vs_torch_ops": float(row_err.max())})
            log(f"    layer {index:2d} n={n:<4} r={r:<3} ours {fmt_us(med['ours'])} us (match "
                f"{fmt_us(med['ours_match'])})  torch ops {fmt_us(med['torch_ops'])} us  layer {fmt_us(med['layer_n'])}"
                f" us, saved/later layer {fmt_us(saved)} us  [agree {agree:.2f}]")
    cell = share.result()
    log(f"    ({cell['seconds']:.0f} s, CPU share {cell['cpu_share']:.2f})")
    layer0 = rows[0]["layer_n_us"] if rows and rows[0]["layer"] == 0 else None
    # the speed-up if every layer ran as fast as the unpatched layer does on the tokens entering it
    # (includes the lower efficiency of smaller matmuls, which the FLOP ideal ignores)
    layer_time_ideal = (None if layer0 is None or len(rows) != len(stack)
                        else layer0 * len(stack) / sum(r_["layer_split_us"] for r_ in rows))
    del model, encoder, captured
    gc.collect()
    return {"model": name, "batch": batch, "r": args.overhead_r, "tokens_per_layer": tokens, "protected": list(protect),
            "input_tokens": N0, "rows": rows, "cell": cell,
            "sum_ours_us": sum(r_["ours_us"] for r_ in rows),
            "sum_torch_ops_us": sum(r_["torch_ops_us"] for r_ in rows),
            "unpatched_encoder_us_estimate": None if layer0 is None else layer0 * len(stack),
            "layer_time_ideal_speedup": layer_time_ideal,
            "flop_ideal_speedup": model_flops(cfg, [N0] * len(tokens), _classifier_heads(name))
            / model_flops(cfg, tokens, _classifier_heads(name))}


def _time_round_robin(fns: dict[str, Callable[[], object]], timer, warmup: int, rounds: int) -> dict[str, float]:
    """Median seconds per callable; one call of each per round, round-robin. Fast callables get
    several timed calls per round (at least 50 ms of calls), so their medians are not dominated by
    timer resolution."""
    import statistics

    per_call = {}
    for name, fn in fns.items():
        fn()
        per_call[name] = max(timer(fn), 1e-7)
    inner = {name: max(1, min(200, int(0.05 / t))) for name, t in per_call.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for rnd in range(max(warmup, 0) + max(rounds, 3)):
            for name, fn in fns.items():
                k = inner[name]

                def many(fn=fn, k=k):
                    for _ in range(k):
                        fn()

                t = timer(many) / k
                if rnd >= warmup:
                    samples[name].append(t)
    finally:
        if gc_was:
            gc.enable()
    return {name: statistics.median(v) for name, v in samples.items()}


# -- report -----------------------------------------------------------------------------------------
def _markdown(payload: dict) -> str:
    m, c = payload["machine"], payload["config"]
    where = (f"{m['gpu']} (CUDA {m['cuda_runtime']})" if c["device"] == "cuda" else
             f"{m['cpu_model']}; {m['cpu_count']} CPUs, torch threads {m['torch_threads']}; slimformer CPU kernel "
             f"{m['active_cpu_isa']}")
    commit = m["git_commit"] + (" (uncommitted changes)" if m.get("git_dirty") else "")
    lines = [f"# Token merging (ToMe) benchmark: {c['device']}, {c['dtype']}" + (" (quick)" if c["quick"] else ""), "",
             f"- date: {m['date']}; command: `{c['command_line']}`",
             f"- machine: {where}",
             f"- torch {m['torch']}, transformers {c['transformers']}, slimformer {m['slimformer']}, commit {commit}",
             f"- load average (1 min) at start / end: {m['load_avg_1m_at_start']:.2f} / {m['load_avg_1m_at_end']:.2f}"
             + (" -- **the machine was busy: these numbers are unreliable**" if m["busy"] else ""),
             f"- mode {c['mode']}, prop_attn {c['prop_attn']}, unmerge {c['unmerge']}; random weights, eval, "
             f"inference_mode; median of {c['rounds']} rounds after {c['warmup']} warm-up round(s), unpatched and "
             "patched forwards interleaved in every round", ""]
    rows = payload.get("throughput") or []
    if rows:
        body = []
        for r in rows:
            ref = r["timm_tome_reference"]
            body.append([r["model"], r["batch"], r["r"], f"{r['tokens_per_layer'][0]}->{r['final_tokens']}",
                         f"{r['hf_ms']:,.1f}", f"{r['tome_ms']:,.1f}", f"{r['hf_img_s']:.2f}", f"{r['tome_img_s']:.2f}",
                         f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x",
                         f"{100 * r['speedup'] / r['ideal_speedup']:.0f}%",
                         "-" if ref is None else f"{ref:.2f}x",
                         "-" if ref is None else f"{r['speedup'] / ref:.2f}x",
                         f"{r['cell']['cpu_share']:.2f}" if c["device"] == "cpu" else "-"])
        lines += ["## Throughput", "",
                  markdown_table(["model", "batch", "r", "tokens", "HF ms", "ToMe ms", "HF img/s", "ToMe img/s",
                                  "speed-up", "ideal", "of ideal", "timm ToMe", "vs timm ToMe", "CPU share"], body,
                                 align="lrrr" + "r" * 10), "",
                  "- HF = the unpatched transformers model; ToMe = the same model after `slimformer.tome.apply(model, "
                  "r=r)`; ms = median per forward of the whole batch; speed-up = HF ms / ToMe ms.",
                  "- tokens: entering the first layer -> leaving the last (ToMe's clamp: a layer merges at most half "
                  "of its unprotected tokens).",
                  "- ideal = model FLOPs unpatched / patched from `model.tome.tokens_per_layer` (attention on the "
                  "tokens entering a layer, MLP on those left after its merge; merging counted as free).",
                  "- timm ToMe = the original ToMe's timm patch vs unpatched timm, measured earlier on this machine "
                  "(2 cores, fp32); vs timm ToMe = our speed-up / theirs.",
                  "- gate before timing: r = 0 gives the unpatched encoder output bit for bit; every r > 0 output is "
                  "finite.",
                  "- CPU share (per model and batch): CPU seconds this process got / (wall seconds x torch threads); "
                  "about 0.9-1.0 alone, clearly lower when another job competed for the cores (then the r = 0 row "
                  "drifts from 1.00x too).", ""]
    for cell in payload.get("overhead") or []:
        body = []
        for r in cell["rows"]:
            body.append([r["layer"], r["tokens_in"], r["r"], fmt_us(r["ours_us"]), fmt_us(r["metric_us"]),
                         fmt_us(r["ours_match_us"] - r["metric_us"]), fmt_us(r["ours_merge_us"]),
                         fmt_us(r["torch_ops_us"]), f"{r['torch_ops_us'] / r['ours_us']:.2f}x",
                         f"{(r['torch_ops_us'] - r['metric_us']) / max(r['ours_us'] - r['metric_us'], 1e-9):.2f}x",
                         fmt_us(r["layer_n_us"]),
                         fmt_us(r["saved_per_later_layer_us"]),
                         f"{r['ours_us'] / r['saved_per_later_layer_us']:.2f}" if r["saved_per_later_layer_us"] > 0
                         else "-", f"{100 * r['ours_us'] / r['layer_n_us']:.1f}%", r["later_layers"],
                         f"{r['rows_agreeing_with_torch_ops']:.2f}"])
        est = cell["unpatched_encoder_us_estimate"]
        sum_metric = sum(r["metric_us"] for r in cell["rows"])
        body.append(["sum", "", "", fmt_us(cell["sum_ours_us"]), fmt_us(sum_metric), "", "",
                     fmt_us(cell["sum_torch_ops_us"]),
                     f"{cell['sum_torch_ops_us'] / max(cell['sum_ours_us'], 1e-9):.2f}x",
                     f"{(cell['sum_torch_ops_us'] - sum_metric) / max(cell['sum_ours_us'] - sum_metric, 1e-9):.2f}x",
                     fmt_us(sum(r["layer_n_us"] for r in cell["rows"])), "", "",
                     "-" if est is None else f"{100 * cell['sum_ours_us'] / est:.1f}%", "", ""])
        share = f"; CPU share {cell['cell']['cpu_share']:.2f}" if c["device"] == "cpu" else ""
        lines += [f"## Merge overhead per layer: {cell['model']}, batch {cell['batch']}, r = {cell['r']} "
                  f"(protected tokens {cell['protected']}{share})", "",
                  markdown_table(["layer", "n", "r", "ours us", "metric us", "match us", "merge us", "torch ops us",
                                  "ours vs torch", "excl. metric", "layer us", "saved us", "ours / saved",
                                  "ours / layer", "later layers", "agree"], body, align="r" * 16), ""]
        if cell.get("layer_time_ideal_speedup"):
            tp = [r for r in payload.get("throughput") or [] if r["model"] == cell["model"]
                  and r["batch"] == cell["batch"] and r["r"] == cell["r"]]
            lines += [f"Ideal speed-up at r = {cell['r']}: FLOPs {cell['flop_ideal_speedup']:.2f}x; layer times "
                      f"{cell['layer_time_ideal_speedup']:.2f}x (12 x layer 0's unpatched time / sum over layers of "
                      "attention on n + MLP on n - r, timed without the merge)"
                      + (f"; measured {tp[0]['speedup']:.2f}x" if tp else "") + ".", ""]
    if payload.get("overhead"):
        lines += ["- ours = metric (head-averaged key projection) + protected tokens and roles + `tome_match` + "
                  "`tome_merge` + source map + log(size) bias, what a patched layer adds; metric = the metric alone "
                  "(one [n, D] x [D, head_dim] matmul), match = roles + `tome_match`, merge = the rest.",
                  "- torch ops = the same with plain torch ops as the original ToMe does it (normalise, a @ b^T, "
                  "max/argmax, argsort, gather, scatter_reduce of x*size and size, divide), same metric and "
                  "bookkeeping.",
                  "- layer us = the unpatched layer (attention + MLP) on the n tokens entering it; saved us = layer "
                  "on n minus layer on n - r tokens: what the r merged tokens would have cost in each later layer. "
                  "ours / saved < 1: the merge pays for itself within one later layer.",
                  "- excl. metric = (torch ops - metric) / (ours - metric): the matching + merging alone, both sides "
                  "paying the same metric.",
                  "- sum row: ours / layer = total merge time over 12 x the first layer's time (about the unpatched "
                  "encoder). Layer-time ideal: the speed-up if the merges were free, from timed layers (attention "
                  "on the n tokens entering a layer, MLP on the n - r left); below the FLOP ideal where smaller "
                  "matmuls run at fewer FLOP/s, above it where fewer tokens fit the caches better.",
                  "- agree = fraction of rows where ours and torch ops, unmerged to the input tokens, agree (rel. err "
                  "<= 1e-4); a row differs only when two near-tied scores rank differently. Our merge is checked "
                  "against the fp64 reference on every layer (run aborts on a mismatch).", ""]
    return "\n".join(lines)


def _wait_quiet(seconds: float, log) -> None:
    if seconds <= 0 or not hasattr(os, "getloadavg"):
        return
    deadline = time.time() + seconds
    while os.getloadavg()[0] >= 0.5 and time.time() < deadline:
        log(f"waiting for a quiet machine: load average {os.getloadavg()[0]:.2f}")
        time.sleep(min(30.0, max(deadline - time.time(), 0.1)))


def run(args: argparse.Namespace, log=print) -> dict:
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    model_list = [m for m in args.models.split(",") if m]
    bad = set(model_list) - set(MODELS)
    if bad:
        raise SystemExit(f"unknown models {sorted(bad)}; choose from {','.join(MODELS)}")
    parts = {p for p in args.parts.split(",") if p}
    if not parts or parts - {"throughput", "overhead"}:
        raise SystemExit("--parts: throughput, overhead or both")
    custom = args.batches is not None or args.rs is not None or args.models != ",".join(MODELS) or (
        args.mode != "tome" or not args.prop_attn or args.unmerge or args.dtype is not None or args.overhead_r != 16
        or parts != {"throughput", "overhead"})
    args.batches = args.batches or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    args.rs = args.rs if args.rs is not None else DEFAULT_RS
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    args.dtype_t = _DTYPES[args.dtype]
    _wait_quiet(args.wait_quiet, log)
    machine = machine_facts(args.device)
    if is_busy(args.device, machine):
        log(f"WARNING: load average {machine['load_avg_1m_at_start']:.2f}: other work is running, timings are noisy")
    config = {"device": args.device, "dtype": args.dtype, "models": model_list, "batches": args.batches, "rs": args.rs,
              "parts": sorted(parts), "overhead_r": args.overhead_r, "mode": args.mode, "prop_attn": args.prop_attn,
              "unmerge": args.unmerge, "rounds": args.rounds, "warmup": args.warmup, "seed": args.seed,
              "quick": args.quick, "transformers": transformers.__version__,
              "command_line": getattr(args, "command_line", " ".join(sys.argv))}
    log(f"slimformer token merging benchmark on {machine['gpu'] or machine['cpu_model']}, torch {machine['torch']}, "
        f"{torch.get_num_threads()} threads")
    timer = _timer(args.device)
    throughput, overhead = [], []
    if "throughput" in parts:
        for name in model_list:
            for batch in args.batches:
                throughput += _throughput_cell(args, name, batch, timer, log)
                gc.collect()
    if "overhead" in parts:
        for name in model_list:
            for batch in args.batches:
                overhead.append(_overhead_cell(args, name, batch, timer, log))
    machine["load_avg_1m_at_end"] = os.getloadavg()[0]
    machine["busy"] = is_busy(args.device, machine)
    payload = {"benchmark": "tome", "machine": machine, "config": config, "throughput": throughput,
               "overhead": overhead}
    tag = "_quick" if args.quick else "_custom" if custom else ""
    publish(f"tome_{args.device}{tag}", payload, _markdown(payload), args.out, not args.no_write, log)
    return payload


def run_cli(args: argparse.Namespace) -> int:
    return guarded_run(run, args)


def main(argv: Sequence[str] | None = None, prog: str = "bench_tome") -> int:
    """Stand-alone entry point (``benchmarks/bench_tome.py``)."""
    return run_cli(parse_command_line(add_arguments, DESCRIPTION, prog, argv))


if __name__ == "__main__":
    sys.exit(main(prog="python -m slimformer.bench.tome"))
