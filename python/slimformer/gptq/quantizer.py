"""Quantize a Hugging Face model with GPTQ (or round-to-nearest), in place, block by block.

The model's repeated blocks (decoder or encoder layers) are found automatically. GPTQ runs:

1. Capture the inputs of block 0 (hidden states and the keyword arguments the model passes, such
   as rotary embeddings and masks) by running the model on the calibration examples and stopping
   at block 0.
2. For each block, on the compute device: find its linear layers (``nn.Linear`` and GPT-2's
   ``Conv1D``) and the order in which they run; layers fed the same tensor (q/k/v, gate/up) form a
   step. With ``true_sequential`` each step is calibrated on the inputs produced by the already
   quantized steps before it (q/k/v, then o, then gate/up, then down for Llama); the forward stops
   as soon as the step's last layer has seen its input. Each step's Hessian H = 2/n sum x x^T
   (fp32) is shared by the layers that read the same input, each layer is quantized by
   :func:`slimformer.gptq.solver.quantize_layer`, and replaced by a :class:`QuantLinear`.
3. Run the quantized block on all examples: its outputs are block i+1's inputs.

Only the block being quantized visits the compute device; peak memory is about one block, the
Hessians of one step and the calibration activations.

Example::

    from transformers import AutoModelForCausalLM
    import slimformer.gptq as gptq
    model = AutoModelForCausalLM.from_pretrained("path/to/model")
    examples = torch.randint(0, model.config.vocab_size, (16, 512))   # real text in practice
    gptq.quantize(model, examples, bits=4, group_size=128)
    gptq.save(model, "model-gptq-4bit")
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..blocks import find_blocks, set_submodule
from ..nn.quant_linear import QuantLinear
from .config import GPTQConfig
from .packing import zero_offset
from .solver import GridWeights, quantize_layer, round_to_nearest

try:  # GPT-2 family stores its linear layers transposed
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

log = logging.getLogger(__name__)
LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed inputs have been seen."""


@dataclass
class LayerStats:
    name: str
    loss: float  # GPTQ's sum((w - q)^2 / Hinv_ii^2) / 2; 0 for RTN
    seconds: float


@dataclass
class QuantizeReport:
    """What :func:`quantize` did, kept on the model as ``model.slimformer_quantize_report``."""

    method: str
    config: GPTQConfig
    layers: list[LayerStats] = field(default_factory=list)
    seconds: float = 0.0


# -- model structure ----------------------------------------------------------------------------
def _linear_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (Conv1D stores [in, out])."""
    return layer.weight.t() if Conv1D and isinstance(layer, Conv1D) else layer.weight


# -- calibration data ---------------------------------------------------------------------------
def _batches(examples, batch_size: int) -> list[torch.Tensor]:
    """Token-id batches: a [n, seq] tensor is cut into rows of ``batch_size``; a list of 1-D (or
    [1, seq]) tensors is batched by equal length."""
    if isinstance(examples, torch.Tensor):
        if examples.dim() == 1:
            examples = examples[None]
        if examples.dim() != 2 or examples.shape[0] == 0:
            raise ValueError(f"examples must be a [n, seq] tensor of token ids, got shape {tuple(examples.shape)}")
        rows = list(examples)
    else:
        rows = [torch.as_tensor(e).reshape(-1) for e in examples]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("GPTQ needs at least one non-empty calibration example")
    if any(r.is_floating_point() for r in rows):
        raise ValueError("examples must be integer token ids")
    by_len: dict[int, list[torch.Tensor]] = {}
    for r in rows:
        by_len.setdefault(r.numel(), []).append(r.long())
    out = []
    for same in by_len.values():
        for i in range(0, len(same), batch_size):
            out.append(torch.stack(same[i:i + batch_size]))
    return out


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor], device):
    """Run the model up to ``block`` on each batch: [(hidden_states, other kwargs)] on ``device``."""
    captured = []

    def grab(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.update(zip(_positional_names(block)[1:], args[1:]))
        captured.append((hidden.to(device), _to(kwargs, device)))
        raise _StopForward

    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    model_device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(model_device), **extra)
            except _StopForward:
                pass
            else:
                raise RuntimeError(f"the model never called its block {type(block).__name__}")
    finally:
        handle.remove()
    return captured


def _positional_names(module: nn.Module) -> list[str]:
    return [p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


# -- one block ----------------------------------------------------------------------------------
@dataclass
class _Step:
    """Layers calibrated together; ``sources[name]`` is the layer whose input ``name`` shares."""

    names: list[str]
    sources: dict[str, str]


def _plan_steps(block: nn.Module, inputs, true_sequential: bool) -> list[_Step]:
    """Call order of the block's linear layers on one batch, grouped by shared input tensor."""
    layers = {n: m for n, m in block.named_modules() if isinstance(m, LINEAR_TYPES)}
    order: list[tuple[str, torch.Tensor]] = []

    def record(name):
        def hook(_m, args):
            order.append((name, args[0]))  # holding x keeps its memory from being reused
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    try:
        hidden, kwargs = inputs[0]
        _run_block(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    seen, calls = set(), []
    for name, x in order:  # a layer called twice (weight sharing) is calibrated on its first call
        if name not in seen:
            seen.add(name)
            calls.append((name, (x.data_ptr(), tuple(x.shape), tuple(x.stride()))))
    del order
    steps: list[_Step] = []
    first_with_key: dict[tuple, str] = {}
    for name, key in calls:
        same_input = first_with_key.get(key)
        if same_input is not None and (not true_sequential or same_input in steps[-1].names):
            # shares an input with an earlier layer of the current step: one Hessian for both
            steps[-1].names.append(name)
            steps[-1].sources[name] = same_input
            continue
        first_with_key.setdefault(key, name)
        if true_sequential or not steps:
            steps.append(_Step([name], {name: name}))
        else:
            steps[-1].names.append(name)
            steps[-1].sources[name] = name
    return steps


class _Replay:
    """Replays, per batch, the outputs of the block's parts that are already fully quantized.

    Upstream of the step being calibrated everything is quantized and fixed, so a submodule whose
    linear layers are all quantized gets the same inputs in every later pass over the same batch
    and returns the same output: it is computed once and replayed (e.g. the whole attention while
    gate/up and down are calibrated). Once a part has an output for a batch, its sub-parts' outputs
    for that batch are dropped: they will not be asked for again.
    """

    enabled = True  # tests switch it off to check that replaying changes nothing

    def __init__(self, block: nn.Module):
        self.block = block
        self.cache: dict[tuple, object] = {}
        self.batch = 0
        self.calls: dict[str, int] = {}
        self.installed: list[nn.Module] = []

    def _fully_quantized(self) -> list[str]:
        def leaves(mod):
            return [m for m in mod.modules() if isinstance(m, LINEAR_TYPES + (QuantLinear,))]
        return [n for n, m in self.block.named_modules()
                if n and leaves(m) and all(isinstance(x, QuantLinear) for x in leaves(m))]

    def __enter__(self) -> "_Replay":
        if not self.enabled:
            return self
        for name in self._fully_quantized():
            mod = self.block.get_submodule(name)
            mod.forward = self._wrap(name, mod.forward)  # instance attribute shadows the method
            self.installed.append(mod)
        return self

    def __exit__(self, *exc) -> None:
        for mod in self.installed:
            del mod.forward
        self.installed = []

    def start_batch(self, index: int) -> None:
        self.batch, self.calls = index, {}

    def _wrap(self, name: str, forward):
        def replayed(*args, **kwargs):
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            key = (name, self.batch, call)
            if key not in self.cache:
                self.cache[key] = forward(*args, **kwargs)
                inner = name + "."
                for k in [k for k in self.cache if k[1] == self.batch and k[0].startswith(inner)]:
                    del self.cache[k]
            return self.cache[key]
        return replayed


def _run_all(block: nn.Module, inputs, replay: _Replay | None) -> list[torch.Tensor | None]:
    """The block on every batch (outputs, or None where a hook stopped the forward)."""
    outs = []
    with replay or contextlib.nullcontext():
        for b, (hidden, kwargs) in enumerate(inputs):
            if replay is not None:
                replay.start_batch(b)
            try:
                outs.append(_run_block(block, hidden, kwargs))
            except _StopForward:
                outs.append(None)
    return outs


def _hessians(block: nn.Module, step: _Step, inputs, replay: _Replay | None) -> dict[str, torch.Tensor]:
    """H = 2/n sum x x^T over all calibration tokens, for each distinct input of the step.

    The forward stops once the step's last distinct input has been seen: the layers that share it
    need not run."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    last = [n for n in step.names if step.sources[n] == n][-1]

    def hook_for(name):
        accumulate = step.sources[name] == name

        def hook(_m, args):
            if accumulate:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                if name not in sums:
                    sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                    counts[name] = 0
                sums[name].addmm_(x.t(), x)
                counts[name] += x.shape[0]
            if name == last:
                raise _StopForward
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in step.names]
    try:
        _run_all(block, inputs, replay)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in step.names if step.sources[n] not in sums]
    if missing:
        raise RuntimeError(f"layers {missing} were not called during calibration")
    return {n: sums[n].mul_(2 / counts[n]) for n in sums}


def _quantized(layer: nn.Module, grid: GridWeights, cfg: GPTQConfig) -> QuantLinear:
    bias = layer.bias.detach() if layer.bias is not None else None
    q = QuantLinear.from_grid(grid.q, grid.scales, grid.zeros, grid.g_idx, cfg.bits, cfg.group_size, bias,
                              cfg.checkpoint_format)
    return q.to(layer.weight.device)


# -- public API ---------------------------------------------------------------------------------
@torch.no_grad()
def quantize(model: nn.Module, examples: torch.Tensor | Sequence[torch.Tensor] | None = None, bits: int = 4,
             group_size: int = 128, desc_act: bool = False, sym: bool = True, damp_percent: float = 0.01,
             static_groups: bool = False, true_sequential: bool = True, mse: float = 0.0, method: str = "gptq",
             checkpoint_format: str = "gptq", lm_head: bool = False, batch_size: int = 8, block_size: int = 128,
             device: str | torch.device | None = None, progress: bool = True) -> nn.Module:
    """Quantize ``model``'s block linear layers in place; returns the model.

    ``examples``: calibration token ids, a [n, seq] tensor or a list of 1-D tensors (not needed
    for ``method="rtn"``). ``method``: ``"gptq"`` or ``"rtn"`` (round-to-nearest on the same grid,
    no error feedback: the baseline). ``desc_act`` is act-order; ``static_groups`` fixes each
    group's grid before the solver runs; ``mse`` > 0 searches each group's clipping range for the
    least sum |w - q|^mse (2.4 in the GPTQ reference; the paper uses min/max); ``checkpoint_format``
    is ``"gptq"`` (v1, what most loaders read) or ``"gptq_v2"``. ``device``: where each block is
    quantized (default: where it is).
    Embeddings and anything else outside the blocks stay in full precision; so does the output
    layer unless ``lm_head=True`` (quantized last, on the quantized model's inputs; a weight tied to
    the input embeddings is untied, the embeddings keep full precision). The config
    is stored as ``model.config.quantization_config`` and per-layer stats as
    ``model.slimformer_quantize_report``.
    """
    cfg = GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, damp_percent=damp_percent,
                     static_groups=static_groups, true_sequential=true_sequential, mse=mse,
                     checkpoint_format=checkpoint_format)
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model already has QuantLinear layers; quantize a full-precision model")
    head = _output_layer(model) if lm_head else None
    _, blocks = find_blocks(model)
    report = QuantizeReport(method, cfg)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if method == "rtn":
            _quantize_rtn(blocks, cfg, report, progress)
        else:
            if examples is None:
                raise ValueError("GPTQ needs calibration examples (token ids); method='rtn' needs none")
            batches = _batches(examples, batch_size)
            _quantize_gptq(model, blocks, batches, cfg, block_size, device, report, progress)
        if head is not None:
            _quantize_output_layer(model, head, batches if method == "gptq" else None, cfg, block_size, report)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    if head is not None:
        cfg.extra["lm_head"] = True  # GPTQModel's key for a quantized output layer
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = cfg.to_dict()
    model.slimformer_quantize_report = report
    return model


def _output_layer(model: nn.Module) -> tuple[str, nn.Module]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, LINEAR_TYPES):
        raise ValueError(f"lm_head=True: {type(model).__name__} has no linear output layer to quantize")
    name = next(n for n, m in model.named_modules() if m is head)
    return name, head


def _quantize_output_layer(model: nn.Module, head: tuple[str, nn.Module], batches, cfg: GPTQConfig,
                           block_size: int, report: QuantizeReport) -> None:
    """Quantize the output layer: GPTQ on its inputs from the (already quantized) model, or RTN."""
    name, layer = head
    t0 = time.perf_counter()
    weight = _linear_weight(layer).detach().clone()  # a tied weight is shared with the embeddings
    if batches is None:
        grid, loss = round_to_nearest(weight, cfg.bits, cfg.group_size, cfg.sym, zero_offset(cfg.checkpoint_format),
                                      cfg.mse), 0.0
    else:
        step = _Step([name], {name: name})
        # The whole model runs on each batch, stopped at the output layer's input.
        extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
        hessian = _hessians(model, step, [(ids.to(weight.device), extra) for ids in batches], None)[name]
        grid, loss = quantize_layer(weight, hessian, cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act,
                                    cfg.damp_percent, cfg.static_groups, block_size,
                                    min_zero=zero_offset(cfg.checkpoint_format), mse=cfg.mse)
    set_submodule(model, name, _quantized(layer, grid, cfg))
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the embeddings keep their full-precision weight
    report.layers.append(LayerStats(name, loss, time.perf_counter() - t0))


def _quantize_rtn(blocks: nn.ModuleList, cfg: GPTQConfig, report: QuantizeReport, progress: bool) -> None:
    min_zero = zero_offset(cfg.checkpoint_format)
    for block in tqdm(blocks, desc=f"RTN {cfg.bits}-bit", disable=not progress):
        for name, layer in [(n, m) for n, m in block.named_modules() if isinstance(m, LINEAR_TYPES)]:
            t0 = time.perf_counter()
            grid = round_to_nearest(_linear_weight(layer), cfg.bits, cfg.group_size, cfg.sym, min_zero, cfg.mse)
            set_submodule(block, name, _quantized(layer, grid, cfg))
            report.layers.append(LayerStats(name, 0.0, time.perf_counter() - t0))


def _home_device(block: nn.Module, index: int) -> torch.device:
    devices = {p.device for p in block.parameters()}
    if torch.device("meta") in devices:
        raise ValueError(f"block {index} has parameters on the meta device (offloaded by accelerate?); GPTQ needs "
                         "the weights in memory: load the model on CPU or on GPUs without disk/CPU offload")
    if len(devices) != 1:
        raise ValueError(f"block {index} is spread over devices {sorted(map(str, devices))}; GPTQ works block by block "
                         "and needs each block on one device")
    return devices.pop()


def _quantize_gptq(model, blocks, batches, cfg: GPTQConfig, block_size: int, device, report, progress) -> None:
    # Each block is quantized on `device`, or where it lives (a model dispatched over GPUs with
    # accelerate's device_map keeps every block on its own GPU); the activations follow it.
    first = torch.device(device) if device is not None else _home_device(blocks[0], 0)
    inputs = _capture_block_inputs(model, blocks[0], batches, first)
    min_zero = zero_offset(cfg.checkpoint_format)
    bar = tqdm(range(len(blocks)), desc=f"GPTQ {cfg.bits}-bit", disable=not progress)
    for i in bar:
        block = blocks[i]
        home = _home_device(block, i)
        target = torch.device(device) if device is not None else home
        block.to(target)
        inputs = [(hidden.to(target), _to(kwargs, target)) for hidden, kwargs in inputs]
        losses = []
        replay = _Replay(block)
        for step in _plan_steps(block, inputs, cfg.true_sequential):
            hessians = _hessians(block, step, inputs, replay)
            for name in step.names:
                t0 = time.perf_counter()
                layer = block.get_submodule(name)
                grid, loss = quantize_layer(_linear_weight(layer), hessians[step.sources[name]], cfg.bits,
                                            cfg.group_size, cfg.sym, cfg.desc_act, cfg.damp_percent,
                                            cfg.static_groups, block_size, min_zero=min_zero, mse=cfg.mse)
                set_submodule(block, name, _quantized(layer, grid, cfg))
                full = f"{i}.{name}"
                report.layers.append(LayerStats(full, loss, time.perf_counter() - t0))
                losses.append((loss, name))
                log.info("block %d %s: loss %.4g", i, name, loss)
            del hessians
        # The quantized block's outputs are the next block's inputs.
        outputs = _run_all(block, inputs, replay)
        inputs = [(out, kwargs) for out, (_, kwargs) in zip(outputs, inputs)]
        del replay
        block.to(home)
        worst = max(losses)
        bar.set_postfix_str(f"max loss {worst[0]:.3g} ({worst[1]})")
