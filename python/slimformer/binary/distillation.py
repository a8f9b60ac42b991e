"""Knowledge distillation for binarized (or otherwise compressed) transformers: BiT-style
logits + hidden-state + attention-map losses, optional Teacher Intervention, resumable.

Typical use::

    import copy
    from slimformer.binary import binarize, distill
    teacher = copy.deepcopy(model)            # full precision, before binarizing
    binarize(model, config)                   # the student, binarized in place
    history = distill(model, teacher, batches, steps=2000, lr=5e-4,
                      intervention_steps=500, checkpoint_dir="ckpt", checkpoint_every=200)

Any Hugging Face model works as teacher or student, as long as it returns ``hidden_states`` and
``attentions`` when asked (``output_hidden_states=True`` / ``output_attentions=True``). A model
that uses ``sdpa`` or flash attention is switched to ``eager`` for the run when the attention
loss is on (and switched back afterwards); binarized attention keeps its own implementation.

Loss terms (every mean below is over the non-padding tokens of ``attention_mask``; a batch
without ``attention_mask`` counts every token):

* ``logits`` -- models with ``logits`` (``[B, S, V]`` or ``[B, C]``): ``T^2 * KL(p_t || p_s)``
  with ``p = softmax(logits / T)``, summed over the classes, mean over tokens (or examples).
  Models without logits (``BertModel``/``AutoModel`` encoders such as MiniLM): MSE of
  ``last_hidden_state`` (mean over features, then tokens).
* ``hidden`` -- MSE of ``hidden_states`` (embedding output and every block output), mean over
  features and tokens per layer, then mean over the layer pairs (so the weight does not scale
  with depth).
* ``attention`` -- per block, the attention probabilities ``[B, H, S, S]``: ``"mse"`` is the mean
  squared difference over entries whose query and key are both real tokens; ``"kl"`` is
  ``KL(a_t || a_s)`` per query row, mean over heads and real query tokens. Mean over blocks.
* ``task`` -- the student's own ``outputs.loss`` (needs ``labels`` in the batches); off by
  default, as in BiT.

``loss = logits_weight*logits + hidden_weight*hidden + attention_weight*attention
+ task_weight*task``. Defaults follow BiT: logits, hidden and attention, weight 1 each.

Layer map: with ``layer_map=None`` the student and the teacher must have the same number of
blocks for the hidden and attention losses; otherwise ``layer_map[i]`` is the teacher block that
student block ``i`` imitates (TinyBERT's uniform map for a 4-block student of a 12-block teacher
is ``[2, 5, 8, 11]``). Hidden-state pairs are then (embeddings, embeddings) and
(output of student block i, output of teacher block ``layer_map[i]``).

Teacher Intervention (TI, Kim et al. 2023), ``intervention_steps=N > 0``: for the first N steps a
forward pre-hook on each student block replaces the block's input hidden state ``h_s`` by
``lam * h_t + (1 - lam) * h_s``, where ``h_t`` is the teacher's input to the matching block for
the same batch (the teacher's ``hidden_states``; with a layer map, the output of teacher block
``layer_map[i-1]``). ``h_t`` is a constant (no gradient). The schedule, for the 0-based step
index ``s``, with ``H = round(intervention_hold * N)``::

    lam(s) = 1                       for s < H          (hold)
    lam(s) = (N - s) / (N - H)       for H <= s < N     (linear decay, 1 -> 1/(N-H))
    lam(s) = 0, hooks removed        for s >= N

The losses compare the student's block outputs (computed from the mixed inputs) with the
teacher's, so early on each block learns from clean teacher inputs and error does not compound
through the binarized stack. The hooks are always removed when ``distill`` returns.

Training: AdamW over every student parameter with ``requires_grad`` (quantizer scales included);
weight decay only on parameters with 2 or more dims (not on biases, norms and scales); a
``LambdaLR`` schedule with linear warmup then linear / cosine decay to 0 (or constant); gradient
clipping by global norm. The teacher runs in eval mode under ``torch.no_grad``. The student runs
in train mode (so quantizers behave as in training) but with dropout off by default
(``dropout=False`` zeroes every ``nn.Dropout`` probability and the float ``*dropout*``
attributes HF attention modules read, restored afterwards): with dropout the student's hidden
states and attention maps would be compared with noise-free teacher ones and the distillation
losses would never reach zero. Pass ``dropout=True`` to keep the model config's dropout.

Checkpoints (``checkpoint_dir``, every ``checkpoint_every`` steps, on early stop and at the end):
``step-XXXXXXXX/`` holds ``student.safetensors``, ``optimizer.safetensors`` (optimizer tensors
and the RNG states) and ``state.json`` (step, optimizer hyper-parameters, scheduler state,
python RNG, history). No pickle. ``resume=True`` loads the newest one and continues; with
deterministic batches (a list, or an iterable that yields the same sequence every pass) the
result equals an uninterrupted run. Resuming skips the batches already consumed.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import random
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import find_blocks

logger = logging.getLogger(__name__)

__all__ = ["distill", "intervention_lambda", "latest_checkpoint"]

CHECKPOINT_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_LOSS_TERMS = ("logits", "hidden", "attention", "task")


# -- schedules ----------------------------------------------------------------------------------
def intervention_lambda(step: int, intervention_steps: int, hold: float = 0.5) -> float:
    """TI mixing weight for 0-based ``step``: 1 for the first ``round(hold * N)`` steps, then a
    linear decay reaching 0 at step ``N = intervention_steps`` (0 from there on)."""
    n = int(intervention_steps)
    if n <= 0 or step >= n:
        return 0.0
    h = min(n, max(0, round(hold * n)))
    if step < h:
        return 1.0
    return (n - step) / (n - h)


class _LRSchedule:
    """LR factor for ``LambdaLR``: linear warmup from 0, then linear/cosine decay to 0 or constant.
    A plain object so that ``LambdaLR.state_dict`` keeps its (JSON-able) attributes."""

    def __init__(self, warmup: int, total: int, kind: str):
        self.warmup, self.total, self.kind = int(warmup), int(total), kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        progress = min(1.0, max(0.0, progress))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# -- model helpers ------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


@contextmanager
def _eager_attention(models: Sequence[nn.Module]):
    """Switch HF models using sdpa / flash attention to eager (which returns attention
    probabilities) for the duration; restore afterwards. Custom implementations are kept."""
    switched = []
    try:
        for m in models:
            impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
            if isinstance(impl, str) and (impl == "sdpa" or impl.startswith("flash")) and hasattr(m, "set_attn_implementation"):
                m.set_attn_implementation("eager")
                switched.append((m, impl))
        yield
    finally:
        for m, impl in switched:
            m.set_attn_implementation(impl)


@contextmanager
def _no_dropout(model: nn.Module, enabled: bool):
    """Zero dropout probabilities (``nn.Dropout*`` modules and float ``*dropout*`` attributes of
    modules, which HF attention functions read) while ``enabled``; restore afterwards."""
    saved: list[tuple[Any, str, float]] = []
    try:
        if enabled:
            for mod in model.modules():
                if isinstance(mod, nn.modules.dropout._DropoutNd):
                    saved.append((mod, "p", mod.p))
                    mod.p = 0.0
                    continue
                for name, value in list(vars(mod).items()):
                    if "dropout" in name and isinstance(value, float) and not isinstance(value, bool) and value != 0.0:
                        saved.append((mod, name, value))
                        setattr(mod, name, 0.0)
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


class _Intervention:
    """Forward pre-hooks on the student's blocks that mix in the teacher's block inputs."""

    def __init__(self, blocks: Sequence[nn.Module], sources: list[int]):
        self.blocks, self.sources = blocks, sources
        self.lam = 0.0
        self.teacher_hidden: Sequence[torch.Tensor] | None = None
        self.handles = [b.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(blocks)]

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            if self.teacher_hidden is None or self.lam == 0.0:
                return None
            t = self.teacher_hidden[self.sources[i]]
            if args:
                h, where = args[0], "arg"
            elif "hidden_states" in kwargs:
                h, where = kwargs["hidden_states"], "kw"
            else:
                raise RuntimeError(f"teacher intervention: block {i} ({type(module).__name__}) got no hidden_states input")
            if t.shape != h.shape:
                raise RuntimeError(f"teacher intervention: block {i} input has shape {tuple(h.shape)} but the "
                                   f"teacher's hidden state has shape {tuple(t.shape)}")
            mixed = self.lam * t.to(device=h.device, dtype=h.dtype) + (1.0 - self.lam) * h
            if where == "arg":
                return (mixed,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": mixed}
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.teacher_hidden = None

    @property
    def active(self) -> bool:
        return bool(self.handles)


# -- losses -------------------------------------------------------------------------------------
def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` [B, S] (or [B]) over positions where ``mask`` is true."""
    if mask is None or values.shape != mask.shape:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def _logits_kl(s: torch.Tensor, t: torch.Tensor, temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
    log_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_t = F.log_softmax(t.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return _masked_mean(kl, mask) * temperature ** 2


def _hidden_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None, what: str) -> torch.Tensor:
    if s.shape != t.shape:
        raise ValueError(f"{what}: student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}")
    return _masked_mean((s.float() - t.float()).pow(2).mean(-1), mask)


def _attention_loss(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None, kind: str, layer: int) -> torch.Tensor:
    """``s``, ``t``: [B, H, Sq, Sk] attention probabilities; ``mask``: [B, S] (1 = real token)."""
    if s.shape != t.shape:
        raise ValueError(f"attention maps of student block {layer}: shape {tuple(s.shape)} != teacher {tuple(t.shape)}")
    s, t = s.float(), t.float()
    b, _, sq, sk = s.shape
    qmask = kmask = None
    if mask is not None and mask.shape == (b, sq) and sq == sk:
        qmask = mask.bool()[:, None, :]                      # [B, 1, Sq]
        kmask = mask.bool()[:, None, None, :]                # [B, 1, 1, Sk]
    if kind == "mse":
        sq_err = (s - t).pow(2)
        if qmask is None:
            return sq_err.mean()
        valid = (qmask[..., None] & kmask).expand_as(sq_err).to(sq_err.dtype)
        return (sq_err * valid).sum() / valid.sum().clamp_min(1.0)
    if kmask is not None:
        s, t = s * kmask, t * kmask
    kl = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(1e-12))).sum(-1)   # [B, H, Sq]
    if qmask is None:
        return kl.mean()
    valid = qmask.expand_as(kl).to(kl.dtype)
    return (kl * valid).sum() / valid.sum().clamp_min(1.0)


# -- checkpoints --------------------------------------------------------------------------------
def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``step-XXXXXXXX`` folder under ``checkpoint_dir`` (None if none)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _jsonable(value):
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor in the JSON part of a checkpoint")
    return value


def _from_json(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _save_checkpoint(root: Path, step: int, student: nn.Module, optimizer, scheduler, history, meta, keep: int) -> Path:
    from safetensors.torch import save_file, save_model

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(student, str(tmp / "student.safetensors"))

    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "optimizer.safetensors"))

    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "meta": meta,
        "optimizer": {"param_groups": _jsonable(opt["param_groups"]), "state_scalars": _jsonable(scalars),
                      "state_indices": [int(i) for i in opt["state"]]},
        "scheduler": _jsonable(scheduler.state_dict()),
        "rng_python": _jsonable(random.getstate()),
        "history": history,
    }
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)

    if keep > 0:
        older = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
        for _, p in older[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, student: nn.Module, optimizer, scheduler, device: torch.device) -> dict:
    from safetensors.torch import load_file, load_model

    with open(path / "state.json") as f:
        state = json.load(f)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    missing, unexpected = load_model(student, str(path / "student.safetensors"), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(f"{path}: student state does not match the model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_json = state["optimizer"]
    scalars = _from_json(opt_json["state_scalars"])
    opt_state: dict[int, dict[str, Any]] = {}
    for idx in opt_json["state_indices"]:
        entry = dict(scalars.get(str(idx), {}))
        prefix = f"optimizer.{idx}."
        entry.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        opt_state[int(idx)] = entry
    optimizer.load_state_dict({"state": opt_state, "param_groups": _from_json(opt_json["param_groups"])})
    scheduler.load_state_dict(_from_json(state["scheduler"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    random.setstate(_from_json(state["rng_python"]))
    return state


# -- data ---------------------------------------------------------------------------------------
def _batch_stream(batches: Iterable[Mapping[str, Any]], skip: int):
    """Yield batches forever-ish: a fresh ``iter(batches)`` per pass; stops when a pass is empty
    (a one-shot iterator that is used up). The first ``skip`` batches are dropped (resume)."""
    passes = 0
    while True:
        got = False
        for batch in batches:
            got = True
            if skip > 0:
                skip -= 1
                continue
            yield batch
        passes += 1
        if not got:
            if passes == 1:
                raise ValueError("batches is empty")
            return


def _to_device(batch: Mapping[str, Any], device: torch.device, drop: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"each batch must be a dict of tensors (input_ids, attention_mask, ...), got {type(batch).__name__}")
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k not in drop}


# -- argument checks ----------------------------------------------------------------------------
def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_int(name: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# -- the training loop --------------------------------------------------------------------------
def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    steps: int | None = None,
    epochs: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    warmup_steps: int | float = 0.05,
    schedule: str = "linear",
    max_grad_norm: float | None = 1.0,
    logits_weight: float = 1.0,
    hidden_weight: float = 1.0,
    attention_weight: float = 1.0,
    task_weight: float = 0.0,
    temperature: float = 1.0,
    attention_loss: str = "mse",
    layer_map: Sequence[int] | None = None,
    intervention_steps: int = 0,
    intervention_hold: float = 0.5,
    dropout: bool = False,
    device: torch.device | str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict], bool | None] | None = None,
) -> list[dict]:
    """Distil ``teacher`` into ``student`` (trained in place); return the history.

    Args:
        student: the model to train (e.g. binarized by :func:`slimformer.binary.binarize`).
        teacher: the full-precision model (not trained; run in eval mode without gradients).
        batches: an iterable of dicts of tensors (``input_ids``, ``attention_mask``, ...; ``labels``
            only reach the student, and only when ``task_weight > 0``), iterated again for each
            pass. ``attention_mask`` ``[B, S]`` marks the real tokens for every loss.
        steps: optimizer steps; default ``epochs * len(batches)`` (then ``batches`` needs a length).
        epochs: passes over ``batches`` when ``steps`` is None.
        lr, weight_decay: AdamW (decay only on parameters with >= 2 dims).
        warmup_steps: linear warmup, in steps (int) or as a fraction of ``steps`` (float in [0, 1]).
        schedule: ``"linear"`` or ``"cosine"`` decay to 0 after warmup, or ``"constant"``.
        max_grad_norm: gradient clipping by global norm (None or 0: off).
        logits_weight, hidden_weight, attention_weight, task_weight: loss weights (>= 0, not all 0).
        temperature: softmax temperature of the logits KL.
        attention_loss: ``"mse"`` or ``"kl"`` on the attention probabilities.
        layer_map: teacher block index for each student block (needed when depths differ and the
            hidden or attention loss is on).
        intervention_steps, intervention_hold: Teacher Intervention schedule (see the module
            docstring); 0 turns TI off.
        dropout: keep the student's dropout (default False: dropout off, see module docstring).
        device: where the student trains (default: its current device; moved there if given).
            The teacher stays where it is; batches are moved to each model's device.
        checkpoint_dir, checkpoint_every, keep_checkpoints: save every N steps (0: only at the
            end / on early stop), keep the newest ``keep_checkpoints`` (0: all).
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (start fresh if none).
        progress: show a tqdm bar with the loss terms.
        callback: called with each history record after the step; return True to stop early
            (a checkpoint is saved at that step when ``checkpoint_dir`` is set).

    Returns:
        history: one dict per step: ``step`` (1-based, after the update), ``losses`` (``total`` and
        each active term, floats), ``lr`` (the rate used for the step), ``grad_norm``,
        ``ti_lambda``, ``seconds`` (wall time of the step). After a resume it includes the records
        of the steps before the checkpoint.
    """
    # ---- arguments
    weights = {
        "logits": _check_weight("logits_weight", logits_weight),
        "hidden": _check_weight("hidden_weight", hidden_weight),
        "attention": _check_weight("attention_weight", attention_weight),
        "task": _check_weight("task_weight", task_weight),
    }
    if not any(weights.values()):
        raise ValueError("all loss weights are 0: nothing to distil")
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if attention_loss not in ("mse", "kl"):
        raise ValueError(f"attention_loss must be 'mse' or 'kl', got {attention_loss!r}")
    if schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"schedule must be 'linear', 'cosine' or 'constant', got {schedule!r}")
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    _check_weight("weight_decay", weight_decay)
    if max_grad_norm is not None:
        _check_weight("max_grad_norm", max_grad_norm)
    steps = _check_int("steps", steps, 1, allow_none=True)
    epochs = _check_int("epochs", epochs, 1)
    intervention_steps = _check_int("intervention_steps", intervention_steps, 0)
    if not (isinstance(intervention_hold, numbers.Real) and 0.0 <= intervention_hold <= 1.0):
        raise ValueError(f"intervention_hold must be in [0, 1], got {intervention_hold!r}")
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 0)
    keep_checkpoints = _check_int("keep_checkpoints", keep_checkpoints, 0)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if student is teacher:
        raise ValueError("student and teacher are the same module; pass a copy of the original as teacher")
    if isinstance(batches, Mapping) or isinstance(batches, torch.Tensor):
        raise TypeError("batches must be an iterable of dicts of tensors, not a single batch")
    if isinstance(batches, Sequence) and len(batches) == 0:
        raise ValueError("batches is empty")
    if steps is None:
        try:
            steps = epochs * len(batches)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("batches has no length: pass steps=") from None
        if steps == 0:
            raise ValueError("batches is empty")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Real):
        raise ValueError(f"warmup_steps must be an int or a fraction, got {warmup_steps!r}")
    if isinstance(warmup_steps, numbers.Integral):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        warmup = int(warmup_steps)
    else:
        if not 0.0 <= warmup_steps <= 1.0:
            raise ValueError(f"a fractional warmup_steps must be in [0, 1], got {warmup_steps}")
        warmup = int(round(warmup_steps * steps))

    need_hidden = weights["hidden"] > 0
    need_attn = weights["attention"] > 0
    n_s, n_t = _num_layers(student), _num_layers(teacher)
    if layer_map is not None:
        layer_map = [int(i) for i in layer_map]
        if n_s is not None and len(layer_map) != n_s:
            raise ValueError(f"layer_map has {len(layer_map)} entries but the student has {n_s} layers")
        if n_t is not None and any(not 0 <= i < n_t for i in layer_map):
            raise ValueError(f"layer_map entries must be teacher layers 0..{n_t - 1}, got {layer_map}")
    elif (need_hidden or need_attn or intervention_steps) and n_s is not None and n_t is not None and n_s != n_t:
        raise ValueError(f"student has {n_s} layers and teacher {n_t}: pass layer_map= (teacher layer for each "
                         f"student layer) or turn off the hidden/attention losses and teacher intervention")

    # ---- devices, optimizer, scheduler
    if device is not None:
        device = torch.device(device)
        student.to(device)
    else:
        device = _device_of(student)
    teacher_device = _device_of(teacher)

    decay, no_decay = [], []
    for p in student.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the student has no parameters with requires_grad")
    groups = [g for g in ({"params": decay, "weight_decay": float(weight_decay)},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=float(lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LRSchedule(warmup, steps, schedule))
    params = decay + no_decay

    meta = {"steps": steps, "lr": float(lr), "schedule": schedule, "warmup": warmup,
            "intervention_steps": intervention_steps, "intervention_hold": float(intervention_hold),
            "n_params": sum(p.numel() for p in params)}
    history: list[dict] = []
    start = 0
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume:
        path = latest_checkpoint(ckpt_root)
        if path is None:
            logger.info("distill: no checkpoint in %s, starting from step 0", ckpt_root)
        else:
            saved_meta = json.loads((path / "state.json").read_text())["meta"]
            for key in ("steps", "warmup", "schedule", "intervention_steps", "n_params"):
                if saved_meta.get(key) != meta[key]:
                    raise ValueError(f"checkpoint {path} was made with {key}={saved_meta.get(key)!r}, "
                                     f"this run has {key}={meta[key]!r}")
            state = _load_checkpoint(path, student, optimizer, scheduler, device)
            start, history = int(state["step"]), list(state["history"])
            logger.info("distill: resumed from %s (step %d of %d)", path, start, steps)

    # ---- run
    student_was_training, teacher_was_training = student.training, teacher.training
    intervention: _Intervention | None = None
    last_saved = start
    step = start
    bar = None
    try:
        with _eager_attention([teacher, student] if need_attn else []), _no_dropout(student, not dropout):
            teacher.eval()
            student.train()
            if start >= steps:
                return history
            stream = _batch_stream(batches, skip=start)
            if start > 0:
                # Position the data stream before restoring RNG-sensitive work (a DataLoader may
                # draw from the RNG when iterated); the RNG itself was restored from the checkpoint.
                rng = torch.get_rng_state(), random.getstate()
                first = next(stream, None)
                torch.set_rng_state(rng[0])
                random.setstate(rng[1])
                if first is not None:
                    stream = _chain_first(first, stream)
            if intervention_steps > start:
                blocks = list(find_blocks(student)[1])
                if layer_map is not None and len(layer_map) != len(blocks):
                    raise ValueError(f"layer_map has {len(layer_map)} entries but the student has {len(blocks)} blocks")
                sources = [0] + [(layer_map[i - 1] + 1 if layer_map is not None else i) for i in range(1, len(blocks))]
                intervention = _Intervention(blocks, sources)
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps, initial=start, desc="distill", dynamic_ncols=True)
            for batch in stream:
                t0 = time.perf_counter()
                lam = intervention_lambda(step, intervention_steps, intervention_hold)
                if intervention is not None and lam == 0.0:
                    intervention.remove()
                    intervention = None

                drop = () if weights["task"] > 0 else ("labels",)
                tbatch = _to_device(batch, teacher_device, drop=("labels",))
                sbatch = _to_device(batch, device, drop=drop)
                mask = sbatch.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.dim() != 2:
                    mask = None
                want_hidden = need_hidden or intervention is not None
                with torch.no_grad():
                    t_out = teacher(**tbatch, output_hidden_states=want_hidden, output_attentions=need_attn)
                t_hidden = _moved(getattr(t_out, "hidden_states", None), device) if want_hidden else None
                if intervention is not None:
                    if not t_hidden:
                        raise ValueError("teacher intervention needs the teacher's hidden_states; the teacher returned none")
                    if layer_map is None and len(t_hidden) - 1 != len(intervention.blocks):
                        raise ValueError(f"teacher has {len(t_hidden) - 1} layers and the student {len(intervention.blocks)} "
                                         f"blocks: pass layer_map=")
                    if max(intervention.sources) >= len(t_hidden):
                        raise ValueError(f"layer_map {layer_map} points past the teacher's {len(t_hidden) - 1} layers")
                    intervention.teacher_hidden, intervention.lam = t_hidden, lam
                s_out = student(**sbatch, output_hidden_states=need_hidden, output_attentions=need_attn)
                if intervention is not None:
                    intervention.teacher_hidden = None

                losses = _distill_losses(s_out, t_out, t_hidden, mask, weights, layer_map, float(temperature),
                                         attention_loss, device)
                total = sum(weights[k] * v for k, v in losses.items())
                if not torch.isfinite(total):
                    raise FloatingPointError(f"distill: loss is {total.item()} at step {step + 1}: "
                                             + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if max_grad_norm:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float(max_grad_norm)))
                else:
                    grad_norm = float(torch.linalg.vector_norm(torch.stack(
                        [p.grad.detach().float().norm() for p in params if p.grad is not None] or [torch.zeros(())])))
                step_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                step += 1

                record = {"step": step,
                          "losses": {"total": total.item(), **{k: v.item() for k, v in losses.items()}},
                          "lr": step_lr, "grad_norm": grad_norm, "ti_lambda": lam,
                          "seconds": time.perf_counter() - t0}
                history.append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record["losses"].items()} | {"lr": f"{step_lr:.2e}"}
                                    | ({"ti": f"{lam:.2f}"} if lam else {}), refresh=False)
                stop = bool(callback(record)) if callback is not None else False
                if ckpt_root is not None and ((checkpoint_every and step % checkpoint_every == 0) or stop or step >= steps):
                    _save_checkpoint(ckpt_root, step, student, optimizer, scheduler, history, meta, keep_checkpoints)
                    last_saved = step
                if stop or step >= steps:
                    break
            else:
                if step < steps:
                    logger.warning("distill: batches ran out after %d of %d steps", step, steps)
            if ckpt_root is not None and step > last_saved:
                _save_checkpoint(ckpt_root, step, student, optimizer, scheduler, history, meta, keep_checkpoints)
    finally:
        if intervention is not None:
            intervention.remove()
        if bar is not None:
            bar.close()
        student.train(student_was_training)
        teacher.train(teacher_was_training)
    return history


def _distill_losses(s_out, t_out, t_hidden, mask, weights: dict[str, float], layer_map, temperature: float,
                    attention_loss: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The active loss terms of one step (see the module docstring) from the two models' outputs;
    ``t_hidden`` is the teacher's hidden_states already on ``device``."""
    losses: dict[str, torch.Tensor] = {}
    if weights["logits"] > 0:
        s_log, t_log = getattr(s_out, "logits", None), getattr(t_out, "logits", None)
        if s_log is not None and t_log is not None:
            losses["logits"] = _logits_kl(s_log, t_log.to(device), temperature, mask)
        elif s_log is None and t_log is None:
            s_last = getattr(s_out, "last_hidden_state", None)
            t_last = getattr(t_out, "last_hidden_state", None)
            if s_last is None or t_last is None:
                raise ValueError("logits loss: the models return neither logits nor last_hidden_state")
            losses["logits"] = _hidden_mse(s_last, t_last.to(device), mask, "last_hidden_state")
        else:
            raise ValueError("logits loss: only one of student and teacher returns logits")
    if weights["hidden"] > 0:
        s_h = getattr(s_out, "hidden_states", None)
        if not s_h or not t_hidden:
            raise ValueError("hidden loss: student or teacher returned no hidden_states "
                             "(does the model honour output_hidden_states=True?)")
        pairs = _layer_pairs(len(s_h) - 1, len(t_hidden) - 1, layer_map, "hidden")
        pairs = [(0, 0)] + [(i + 1, j + 1) for i, j in pairs]
        losses["hidden"] = sum(_hidden_mse(s_h[i], t_hidden[j], mask, f"hidden state {i}")
                               for i, j in pairs) / len(pairs)
    if weights["attention"] > 0:
        s_a, t_a = getattr(s_out, "attentions", None), getattr(t_out, "attentions", None)
        if not s_a or not t_a or any(a is None for a in s_a) or any(a is None for a in t_a):
            raise ValueError("attention loss: student or teacher returned no attention maps; its attention "
                             "implementation must honour output_attentions=True (use eager)")
        pairs = _layer_pairs(len(s_a), len(t_a), layer_map, "attention")
        losses["attention"] = sum(_attention_loss(s_a[i], t_a[j].to(device), mask, attention_loss, i)
                                  for i, j in pairs) / len(pairs)
    if weights["task"] > 0:
        task = getattr(s_out, "loss", None)
        if task is None:
            raise ValueError("task_weight > 0 but the student returned no loss (are labels in the batches?)")
        losses["task"] = task.float()
    return losses


def _chain_first(first, rest):
    yield first
    yield from rest


def _moved(tensors, device: torch.device):
    if not tensors:
        return tensors
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors)


def _layer_pairs(n_student: int, n_teacher: int, layer_map: Sequence[int] | None, what: str) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs for the hidden / attention losses."""
    if layer_map is None:
        if n_student != n_teacher:
            raise ValueError(f"{what} loss: student has {n_student} layers and teacher {n_teacher}: pass layer_map= "
                             f"(teacher layer for each student layer)")
        return [(i, i) for i in range(n_student)]
    if len(layer_map) != n_student:
        raise ValueError(f"layer_map has {len(layer_map)} entries but the student has {n_student} layers")
    if any(not 0 <= j < n_teacher for j in layer_map):
        raise ValueError(f"layer_map entries must be teacher layers 0..{n_teacher - 1}, got {list(layer_map)}")
    return list(enumerate(layer_map))
