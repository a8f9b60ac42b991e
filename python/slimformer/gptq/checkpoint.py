"""Save and load GPTQ checkpoint directories (the layout AutoGPTQ, GPTQModel and transformers/optimum use).

A checkpoint directory holds ``config.json`` (with ``quantization_config``), safetensors weights
(``model.safetensors``, or ``model-0000x-of-0000y.safetensors`` shards plus
``model.safetensors.index.json``) in which every quantized linear ``<name>`` is stored as
``<name>.qweight/.qzeros/.scales/.g_idx[/.bias]``, and optionally ``quantize_config.json``,
``generation_config.json`` and tokenizer files.

:func:`load` builds the transformers model with its parameters on the meta device, swaps every
linear that has a ``qweight`` in the checkpoint for a :class:`~slimformer.nn.QuantLinear`, and then
fills tensors straight from the safetensors files, so full-precision copies of the quantized layers
are never allocated. Every tensor is checked against the module it belongs to before any data is
read; problems raise ``ValueError`` naming the file and the tensor.

Example (a tiny random model, quantized with round-to-nearest)::

    import tempfile, torch, transformers
    from slimformer.gptq.checkpoint import load, save
    from slimformer.gptq.config import GPTQConfig
    from slimformer.nn import QuantLinear

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    for name, mod in list(model.model.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            parent, child = name.rsplit(".", 1)
            setattr(model.model.get_submodule(parent), child, QuantLinear.from_linear(mod, 4, 32))
    model.config.quantization_config = GPTQConfig(bits=4, group_size=32).to_dict()
    with tempfile.TemporaryDirectory() as d:
        save(model, d)
        again = load(d)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).logits, again(ids).logits)
"""
from __future__ import annotations

import contextlib
import copy
import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..nn.quant_linear import QuantLinear
from .config import GPTQConfig

__all__ = ["save", "load"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"  # AutoGPTQ (and GPTQModel) read the settings from here
QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")

# safetensors header dtype codes -> torch dtypes (the ones a GPTQ checkpoint can contain)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def save(model: nn.Module, path: str | Path, tokenizer=None, max_shard_size: int | str = "2GB") -> None:
    """Write ``model`` (with QuantLinear layers and ``config.quantization_config``) as a GPTQ checkpoint.

    ``max_shard_size`` is bytes (int) or a string such as ``"500MB"`` / ``"2GB"`` (decimal units);
    larger models are split into ``model-0000x-of-0000y.safetensors`` shards plus an index.
    """
    qcfg = _model_quant_config(model)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise ValueError("save: the model has no QuantLinear layers; quantize it first")
    for name, m in quantized.items():  # a checkpoint has one bits/group_size/format for all layers
        bits, group_size = _module_settings(qcfg, name)
        if (m.bits, m.group_size, m.checkpoint_format) != (bits, group_size, qcfg.checkpoint_format):
            raise ValueError(
                f"save: {name} has bits={m.bits}, group_size={m.group_size}, checkpoint_format="
                f"{m.checkpoint_format!r} but quantization_config says bits={bits}, group_size={group_size}, "
                f"checkpoint_format={qcfg.checkpoint_format!r}")

    if not qcfg.sym and qcfg.checkpoint_format == "gptq":
        # Measured with GPTQModel 7.7.0 (benchmarks/results/interop_gptqmodel_2026-11-28.md).
        warnings.warn("save: an asymmetric checkpoint in format 'gptq' (v1) loads in slimformer, transformers/optimum "
                      "and AutoGPTQ, but GPTQModel refuses asymmetric v1 files it did not write itself; quantize "
                      "with checkpoint_format='gptq_v2' for GPTQModel", UserWarning, stacklevel=2)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = _state_dict_to_save(model)
    _write_safetensors(state, path, max_shard_size)

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.quantization_config = {k: v for k, v in qcfg.to_dict().items() if k != "model_file_base_name"}
    # Loaders (transformers, GPTQModel) use config.dtype as the default compute dtype: record the dtype
    # of the full-precision tensors, not the packed integers.
    float_dtypes = Counter(t.dtype for n, t in state.items()
                           if t.is_floating_point() and not _is_quant_key(n, quantized))
    if float_dtypes:
        config.dtype = float_dtypes.most_common(1)[0][0]
    config.save_pretrained(path)
    quantize_config = {**qcfg.to_dict(), "model_file_base_name": "model"}  # AutoGPTQ looks for model.safetensors
    (path / QUANTIZE_CONFIG_NAME).write_text(json.dumps(quantize_config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _model_quant_config(model: nn.Module) -> GPTQConfig:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        raise ValueError("save: model.config has no quantization_config (set it to GPTQConfig(...).to_dict())")
    if isinstance(qc, GPTQConfig):
        return qc
    return GPTQConfig.from_dict(qc if isinstance(qc, dict) else qc.to_dict())


def _state_dict_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without tied copies; other tensors that share memory are cloned (safetensors needs that)."""
    state = model.state_dict()  # persistent buffers only, so non-persistent ones are never written
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # transformers 5: {target: source}
    out: dict[str, torch.Tensor] = {}
    storages: set[tuple] = set()
    for name, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"save: {name} is on the meta device (never loaded)")
        source = tied.get(name)
        if source in state and _same_view(t, state[source]):
            continue  # written once under the source name, as transformers does; load re-ties
        key = (t.device, t.untyped_storage().data_ptr())
        if key in storages:
            t = t.clone()
        storages.add(key)
        out[name] = t.detach().contiguous()
    return out


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


def _write_safetensors(state: dict[str, torch.Tensor], path: Path, max_shard_size: int | str) -> None:
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    # Drop shards of an earlier save into the same directory, or a loader could pick up stale files.
    for old in [*path.glob("model-*-of-*.safetensors"), path / WEIGHTS_NAME, path / INDEX_NAME]:
        if old.exists() and old.name not in split.filename_to_tensors:
            old.unlink()
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(path / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a GPTQ checkpoint directory into its transformers model class with QuantLinear layers.

    ``dtype`` applies to the non-quantized tensors (embeddings, norms, lm_head, ...); by default
    float32 on CPU and the checkpoint's own dtype elsewhere. QuantLinear scales keep their fp16.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"load: {path} is not a checkpoint directory")
    config, qcfg = _read_configs(path)
    header = _read_headers(path, qcfg)  # tensor name -> (file, shape, dtype); no data read yet
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    with _meta_parameters():
        model = _build_model(config)
    quantized = _replace_quantized_linears(model, header, qcfg)
    expected = model.state_dict(keep_vars=True)  # tied parameters appear under every name
    _check_tensors(header, expected, quantized)

    unexpected = [n for n in header if n not in expected]
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    noisy = [n for n in unexpected if not any(p.search(n) for p in ignore)]
    if noisy:
        warnings.warn(f"load: ignoring {len(noisy)} tensor(s) that belong to no module of "
                      f"{type(model).__name__}: {', '.join(noisy)}", stacklevel=2)

    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else _checkpoint_float_dtype(header, quantized)
    _assign_tensors(model, header, expected, quantized, qcfg, dtype)

    # Tie (e.g. lm_head to the embeddings) unless one side was quantized: a QuantLinear has no weight.
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    model.all_tied_weights_keys = {k: v for k, v in tied.items()
                                   if k.rpartition(".")[0] not in quantized and v.rpartition(".")[0] not in quantized}
    model.tie_weights(missing_keys={n for n in expected if n not in header}, recompute_mapping=False)
    for name, t in model.state_dict(keep_vars=True).items():
        if t.device.type == "meta":
            files = sorted({str(f) for f, _, _ in header.values()})
            where = str(path / INDEX_NAME) if (path / INDEX_NAME).is_file() else ", ".join(files)
            raise ValueError(f"load: tensor {name} is missing from the checkpoint {where}")
    model.config.quantization_config = qcfg.to_dict()
    model.eval()
    return model.to(device)


def _read_configs(path: Path) -> tuple[transformers.PretrainedConfig, GPTQConfig]:
    """The model config and the GPTQ settings (config.json's quantization_config, else quantize_config.json)."""
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(f"load: {path / CONFIG_NAME} not found")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"load: cannot read {path / CONFIG_NAME}: {e}") from e
    raw, source = getattr(config, "quantization_config", None), path / CONFIG_NAME
    if raw is None and (path / QUANTIZE_CONFIG_NAME).is_file():
        source = path / QUANTIZE_CONFIG_NAME
        try:
            raw = json.loads(source.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"load: cannot parse {source}: {e}") from e
    if raw is None:
        raise ValueError(f"load: no quantization_config in {path / CONFIG_NAME} and no {QUANTIZE_CONFIG_NAME}; "
                         "not a GPTQ checkpoint")
    raw = dict(raw if isinstance(raw, dict) else raw.to_dict())
    # Older GPTQModel wrote the format under "format"; AutoGPTQ's Marlin repacking is a different layout.
    if "checkpoint_format" not in raw and "format" in raw:
        raw["checkpoint_format"] = raw.pop("format")
    if raw.get("is_marlin_format"):
        raise ValueError(f"load: {source} describes a Marlin-packed checkpoint (is_marlin_format), not GPTQ")
    try:
        return config, GPTQConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"load: bad quantization config in {source}: {e}") from e


def _weight_files(path: Path, qcfg: GPTQConfig) -> tuple[list[Path], dict[str, Path] | None]:
    """Safetensors files of the checkpoint, and the index's tensor -> file map when sharded."""
    index = path / INDEX_NAME
    base = qcfg.extra.get("model_file_base_name")  # old AutoGPTQ names like gptq_model-4bit-128g
    if not index.is_file() and base and (path / f"{base}.safetensors.index.json").is_file():
        index = path / f"{base}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"load: cannot parse {index}: {e}") from e
        files = {name: path / f for name, f in weight_map.items()}
        for name, f in files.items():
            if not f.is_file():
                raise ValueError(f"load: {index} maps tensor {name} to {f.name}, which does not exist")
        return sorted(set(files.values())), files
    for candidate in [path / WEIGHTS_NAME, *([path / f"{base}.safetensors"] if base else [])]:
        if candidate.is_file():
            return [candidate], None
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:  # e.g. gptq_model-4bit-128g.safetensors without model_file_base_name
        return found, None
    raise ValueError(f"load: no {WEIGHTS_NAME} or {INDEX_NAME} in {path}" +
                     (f" (and several other .safetensors files: {[f.name for f in found]})" if found else ""))


def _read_headers(path: Path, qcfg: GPTQConfig) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    files, weight_map = _weight_files(path, qcfg)
    header: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:  # validates the header against the file size
                for name in st.keys():
                    sl = st.get_slice(name)
                    code = sl.get_dtype()
                    if code not in _ST_DTYPES:
                        raise ValueError(f"load: tensor {name} in {f} has unsupported dtype {code}")
                    if name in header:
                        raise ValueError(f"load: tensor {name} is stored twice ({header[name][0].name} and {f.name})")
                    header[name] = (f, tuple(sl.get_shape()), _ST_DTYPES[code])
        except ValueError:
            raise
        except Exception as e:  # SafetensorError (truncated or garbled file), OSError
            raise ValueError(f"load: cannot read safetensors file {f}: {e}") from e
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in header or header[name][0] != f:
                raise ValueError(f"load: index {path / INDEX_NAME} puts tensor {name} in {f.name}, but it is not there")
    return header


@contextlib.contextmanager
def _meta_parameters() -> Iterator[None]:
    """Create every nn.Parameter on the meta device (buffers stay real, e.g. rotary inv_freq).

    The same trick as accelerate's ``init_empty_weights(include_buffers=False)``: the full-precision
    weights are never allocated (nor randomly initialised) before the checkpoint replaces them.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            kwargs = {**p.__dict__, "requires_grad": p.requires_grad}
            module._parameters[name] = type(p)(p.to("meta"), **kwargs)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build_model(config: transformers.PretrainedConfig) -> nn.Module:
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls(config)
    try:  # no usable architectures entry: a causal LM is the common case for GPTQ checkpoints
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError:
        return transformers.AutoModel.from_config(config, dtype=torch.float32)


def _module_settings(qcfg: GPTQConfig, name: str) -> tuple[int, int]:
    """bits and group_size for module ``name``, honouring GPTQModel's per-module ``dynamic`` overrides."""
    for pattern, override in (qcfg.extra.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            continue  # "-:" excludes modules from quantization: they simply have no qweight
        if re.match(pattern.removeprefix("+:"), name):
            return int(override.get("bits", qcfg.bits)), int(override.get("group_size", qcfg.group_size))
    return qcfg.bits, qcfg.group_size


def _replace_quantized_linears(model: nn.Module, header: dict, qcfg: GPTQConfig) -> dict[str, QuantLinear]:
    """Swap each Linear/Conv1D that has ``<name>.qweight`` in the checkpoint for an (empty) QuantLinear."""
    quantized: dict[str, QuantLinear] = {}
    for key in header:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # belongs to no module: reported with the other unexpected tensors
        if isinstance(module, nn.Linear):
            in_features, out_features = module.in_features, module.out_features
        elif isinstance(module, Conv1D):  # GPT-2 style: weight is [in, out]
            in_features, out_features = module.weight.shape
        else:
            raise ValueError(f"load: tensor {key} in {header[key][0]}: module {name} is a "
                             f"{type(module).__name__}, not a Linear/Conv1D")
        bits, group_size = _module_settings(qcfg, name)
        has_bias = module.bias is not None or f"{name}.bias" in header
        try:
            # meta: the real tensors come from the checkpoint; nothing is allocated here
            quantized[name] = QuantLinear(in_features, out_features, bits, group_size, bias=has_bias,
                                          checkpoint_format=qcfg.checkpoint_format, device="meta")
        except ValueError as e:
            raise ValueError(f"load: cannot build QuantLinear for {key} in {header[key][0]}: {e}") from e
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized[name])
    if not quantized:
        raise ValueError("load: the checkpoint has no .qweight tensor for any Linear of "
                         f"{type(model).__name__}; not a GPTQ checkpoint of this model")
    return quantized


def _is_quant_key(name: str, quantized: dict) -> bool:
    module, _, attr = name.rpartition(".")
    return module in quantized and attr in QUANT_TENSORS


def _check_tensors(header: dict, expected: dict[str, torch.Tensor], quantized: dict[str, QuantLinear]) -> None:
    """Shapes and dtypes of every checkpoint tensor that belongs to the model, before reading any data."""
    for name, (f, shape, dt) in header.items():
        target = expected.get(name)
        if target is None:
            continue
        where = f"tensor {name} in {f}"
        if _is_quant_key(name, quantized):
            attr = name.rpartition(".")[2]
            if attr in ("qweight", "qzeros") and dt != torch.int32:
                raise ValueError(f"load: {where} has dtype {dt}, expected torch.int32 (packed GPTQ words)")
            if attr == "g_idx" and (dt.is_floating_point or dt == torch.bool):
                raise ValueError(f"load: {where} has dtype {dt}, expected an integer type")
            if attr in ("scales", "bias") and not dt.is_floating_point:
                raise ValueError(f"load: {where} has dtype {dt}, expected a floating-point type")
        elif target.is_floating_point() and not dt.is_floating_point:
            raise ValueError(f"load: {where} has dtype {dt}, expected a floating-point type")
        if shape != tuple(target.shape):
            why = ""
            if _is_quant_key(name, quantized):
                q = quantized[name.rpartition(".")[0]]
                why = (f" (in_features={q.in_features}, out_features={q.out_features}, bits={q.bits}, "
                       f"group_size={q.group_size})")
            raise ValueError(f"load: {where} has shape {list(shape)}, expected {list(target.shape)}{why}")
    for name, q in quantized.items():
        qfile = header[f"{name}.qweight"][0]
        for attr in ("qzeros", "scales") + (("bias",) if q.bias is not None else ()):
            if f"{name}.{attr}" not in header:
                raise ValueError(f"load: tensor {name}.{attr} is missing from {qfile} "
                                 f"(the file holding {name}.qweight)")


def _checkpoint_float_dtype(header: dict, quantized: dict) -> torch.dtype:
    dtypes = Counter(dt for n, (_, _, dt) in header.items()
                     if dt.is_floating_point and not _is_quant_key(n, quantized))
    return dtypes.most_common(1)[0][0] if dtypes else torch.float16


def _assign_tensors(model: nn.Module, header: dict, expected: dict, quantized: dict[str, QuantLinear],
                    qcfg: GPTQConfig, dtype: torch.dtype) -> None:
    """Read every expected tensor from its file and put it in place of the meta placeholder."""
    by_file: dict[Path, list[str]] = {}
    for name in header:
        if name in expected:
            by_file.setdefault(header[name][0], []).append(name)
    for f, names in by_file.items():
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in names:
                    t = st.get_tensor(name)
                    if _is_quant_key(name, quantized):
                        if name.endswith(".g_idx"):
                            t = t.to(torch.int32)
                    elif t.is_floating_point():
                        t = t.to(dtype)
                    _set_tensor(model, name, t)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"load: cannot read tensor {name} from {f}: {e}") from e

    for name, q in quantized.items():
        if f"{name}.g_idx" not in header:
            # Some exporters omit g_idx without act-order: the groups are then sequential.
            if qcfg.desc_act:
                raise ValueError(f"load: tensor {name}.g_idx is missing from {header[name + '.qweight'][0]} "
                                 "(required with desc_act=True)")
            gs = q.in_features if q.group_size == -1 else q.group_size
            q.g_idx = (torch.arange(q.in_features) // gs).to(torch.int32)
        try:
            q.post_init()  # validates g_idx against scales and builds the act-order kernel layout
        except ValueError as e:
            raise ValueError(f"load: tensor {name}.g_idx in {header[name + '.qweight'][0]}: {e}") from e


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = t
