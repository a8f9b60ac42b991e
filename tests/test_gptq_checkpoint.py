"""slimformer.gptq.checkpoint: save/load of GPTQ checkpoint directories.

- Round trips (save -> load) of tiny random Llama / GPT-2 (Conv1D) / OPT / Qwen2 models quantized
  with QuantLinear.from_linear give bit-identical logits, single-file and sharded, tied embeddings
  staying tied.
- Checkpoints written the way AutoGPTQ / GPTQModel / optimum write them, with tensors from an
  independent reference packer (tests/gptq_reference_packer.py), load to the same logits as the
  original model carrying the reference-dequantized weights.
- Corrupt or inconsistent checkpoints raise ValueError naming the file and the tensor.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import gptq_reference_packer as ref  # tests/gptq_reference_packer.py
from slimformer.gptq.checkpoint import load, save
from slimformer.gptq.config import GPTQConfig
from slimformer.nn import QuantLinear

transformers.logging.set_verbosity_error()  # tiny configs trip token-id range warnings


def tiny_llama(tie: bool = False) -> nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128)).eval()


def tiny_opt() -> nn.Module:
    cfg = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=128, word_embed_proj_dim=64, max_position_embeddings=64)
    return transformers.OPTForCausalLM(cfg).eval()


def tiny_qwen2() -> nn.Module:  # q/k/v have biases
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def linear_names(model: nn.Module) -> list[str]:
    """Every Linear/Conv1D except the output head (the layers GPTQ quantizes)."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def as_linear(module: nn.Module) -> nn.Linear:
    if isinstance(module, nn.Linear):
        return module
    lin = nn.Linear(*module.weight.shape, bias=module.bias is not None)  # Conv1D: weight is [in, out]
    lin.weight.data = module.weight.data.t().contiguous()
    if module.bias is not None:
        lin.bias.data = module.bias.data.clone()
    return lin


def quantize_rtn(model: nn.Module, bits: int = 4, group_size: int = 32, sym: bool = True, desc_act: bool = False,
                 checkpoint_format: str = "gptq") -> nn.Module:
    for name in linear_names(model):
        lin = as_linear(model.get_submodule(name))
        g_idx = None
        if desc_act:
            gs = lin.in_features if group_size == -1 else group_size
            g_idx = (torch.randperm(lin.in_features) // gs).to(torch.int32)
        set_module(model, name, QuantLinear.from_linear(lin, bits, group_size, g_idx=g_idx,
                                                        checkpoint_format=checkpoint_format, sym=sym))
    model.config.quantization_config = GPTQConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                                                  checkpoint_format=checkpoint_format).to_dict()
    return model


def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, qargs", [
    (tiny_llama, dict(bits=4, group_size=32)),
    (tiny_llama, dict(bits=3, group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2")),
    (tiny_gpt2, dict(bits=4, group_size=-1, sym=False)),
    (tiny_opt, dict(bits=8, group_size=32)),
    (tiny_qwen2, dict(bits=2, group_size=32, sym=False)),
], ids=["llama-4b", "llama-3b-actorder-v2", "gpt2-conv1d", "opt-8b", "qwen2-2b-bias"])
def test_round_trip_identical_logits(tmp_path, make, qargs):
    model = make()
    names = linear_names(model)
    model = quantize_rtn(model, **qargs)
    expected = logits(model)
    save(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.safetensors.index.json").exists()
    again = load(tmp_path)
    assert type(again) is type(model)
    assert torch.equal(logits(again), expected)
    assert all(isinstance(again.get_submodule(n), QuantLinear) for n in names)
    q = again.get_submodule(names[0])
    assert (q.bits, q.group_size, q.checkpoint_format) == (qargs["bits"], qargs["group_size"],
                                                           qargs.get("checkpoint_format", "gptq"))
    assert q.scales.dtype == torch.float16 and q.qweight.dtype == torch.int32
    assert not again.training
    assert GPTQConfig.from_dict(again.config.quantization_config) == GPTQConfig.from_dict(
        model.config.quantization_config)


def test_saved_files(tmp_path):
    model = quantize_rtn(tiny_llama(), bits=4, group_size=32, sym=False)
    save(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] is False
    for key in ("desc_act", "static_groups", "true_sequential", "damp_percent", "checkpoint_format"):
        assert key in qc
    assert config["architectures"] == ["LlamaForCausalLM"]
    quantize_config = json.loads((tmp_path / "quantize_config.json").read_text())
    assert {k: quantize_config[k] for k in qc} == qc
    assert (tmp_path / "generation_config.json").is_file()
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.qweight"].dtype == torch.int32 and tensors[f"{name}.qweight"].shape == (8, 64)
    assert tensors[f"{name}.qzeros"].shape == (2, 8) and tensors[f"{name}.scales"].dtype == torch.float16
    assert tensors[f"{name}.g_idx"].shape == (64,)
    assert not any("inv_freq" in k or k.endswith(("_perm", "_qweight_sorted")) for k in tensors)  # non-persistent


def test_sharded_round_trip(tmp_path):
    model = quantize_rtn(tiny_llama(), bits=4, group_size=32)
    expected = logits(model)
    for size in (20_000, "20KB"):
        d = tmp_path / str(size)
        save(model, d, max_shard_size=size)
        index = json.loads((d / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in d.glob("model-*.safetensors"))
        assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert not (d / "model.safetensors").exists()
        assert torch.equal(logits(load(d)), expected)
    # Saving again unsharded into the same directory leaves no stale shards behind.
    save(model, tmp_path / "20000")
    assert sorted(p.name for p in (tmp_path / "20000").glob("*.safetensors")) == ["model.safetensors"]
    assert torch.equal(logits(load(tmp_path / "20000")), expected)


@pytest.mark.parametrize("make, head, embed", [
    (lambda: tiny_llama(tie=True), "lm_head.weight", "model.embed_tokens.weight"),
    (tiny_gpt2, "lm_head.weight", "transformer.wte.weight"),
], ids=["llama", "gpt2"])
def test_tied_embeddings_written_once_and_retied(tmp_path, make, head, embed):
    model = quantize_rtn(make())
    assert model.get_parameter(head) is model.get_parameter(embed)
    save(model, tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert embed in index and head not in index
    again = load(tmp_path)
    assert again.get_parameter(head) is again.get_parameter(embed)
    assert torch.equal(logits(again), logits(model))


def test_tokenizer_saved(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    save(quantize_rtn(tiny_llama()), tmp_path, tokenizer=tokenizer)
    assert (tmp_path / "tokenizer.json").is_file()
    assert transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)("hello world")["input_ids"] == [1, 2]


def test_load_dtype_and_meta_free(tmp_path):
    save(quantize_rtn(tiny_llama()), tmp_path)
    model = load(tmp_path, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    q = model.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.scales.dtype == torch.float16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers built on CPU, not cast
    assert not any(t.is_meta for t in model.state_dict(keep_vars=True).values())
    assert load(tmp_path).model.norm.weight.dtype == torch.float32  # CPU default


def test_load_never_materialises_linear_weights(tmp_path, monkeypatch):
    save(quantize_rtn(tiny_llama()), tmp_path)
    devices = []
    init = nn.Linear.reset_parameters

    def spy(self):
        devices.append(self.weight.device.type)
        init(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    load(tmp_path)
    assert devices and set(devices) == {"meta"}


def test_save_rejects_unquantized(tmp_path):
    with pytest.raises(ValueError, match="quantization_config"):
        save(tiny_llama(), tmp_path)
    model = tiny_llama()
    model.config.quantization_config = GPTQConfig().to_dict()
    with pytest.raises(ValueError, match="no QuantLinear"):
        save(model, tmp_path)
    model = quantize_rtn(tiny_llama(), bits=4)
    model.config.quantization_config = GPTQConfig(bits=8, group_size=32).to_dict()
    with pytest.raises(ValueError, match="bits=4"):
        save(model, tmp_path)


# ---------------------------------------------------------------------------------------------
# checkpoints written by other tools (independent reference packer)
# ---------------------------------------------------------------------------------------------
def write_peer_checkpoint(path: Path, model: nn.Module, bits: int, group_size: int, sym: bool, desc_act: bool,
                          checkpoint_format: str, style: str, shard: bool, filename: str = "model.safetensors"):
    """Quantize ``model``'s linears with the reference packer and write a checkpoint as ``style`` would.

    Returns the reference model: ``model`` with the dequantized weights and fp16-rounded others.
    """
    rng = np.random.default_rng(bits * 100 + group_size)
    tensors: dict[str, torch.Tensor] = {}
    quantized = linear_names(model)
    for name in quantized:
        lin = model.get_submodule(name)
        packed = ref.quantize(lin.weight.detach().double().numpy(), bits, group_size, sym, desc_act,
                              checkpoint_format, rng)
        for key, value in packed.items():
            tensors[f"{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(value))
        w = ref.dequantize(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits,
                           checkpoint_format)
        lin.weight.data = torch.from_numpy(w.T.copy()).float()
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().half()
            lin.bias.data = tensors[f"{name}.bias"].float()
    for key, value in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in quantized or key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensors[key] = value.half()  # peers store the non-quantized tensors in fp16
        model.get_parameter(key).data = tensors[key].float()

    path.mkdir(parents=True)
    qc = dict(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym)
    if style == "autogptq":  # settings only in quantize_config.json, no checkpoint_format (v1)
        assert checkpoint_format == "gptq"
        model.config.save_pretrained(path)
        qc.update(damp_percent=0.01, static_groups=False, true_sequential=True, model_name_or_path=None,
                  model_file_base_name=None)
        (path / "quantize_config.json").write_text(json.dumps(qc))
    elif style == "gptqmodel":
        qc.update(quant_method="gptq", checkpoint_format=checkpoint_format, lm_head=False, pack_dtype="int32",
                  meta={"quantizer": ["gptqmodel:7.7.0"], "uri": "https://github.com/modelcloud/gptqmodel",
                        "damp_percent": 0.05, "damp_auto_increment": 0.01, "static_groups": False,
                        "true_sequential": True, "mse": 0.0})
        model.config.quantization_config = qc
        model.config.save_pretrained(path)
        (path / "quantize_config.json").write_text(json.dumps(qc))
    elif style == "optimum":  # transformers / optimum: only config.json
        qc.update(quant_method="gptq", damp_percent=0.1, true_sequential=True, use_exllama=True,
                  exllama_config={"version": 1}, block_name_to_quantize="model.layers", dataset=None,
                  tokenizer=None, modules_in_block_to_quantize=None, cache_block_outputs=True,
                  max_input_length=None, model_seqlen=None, use_cuda_fp16=False, checkpoint_format=checkpoint_format)
        model.config.quantization_config = qc
        model.config.save_pretrained(path)
    else:
        raise AssertionError(style)
    model.config.__dict__.pop("quantization_config", None)  # the reference model stays a plain one

    if shard:
        names = sorted(tensors)
        parts = [names[i::3] for i in range(3)]
        weight_map = {}
        for i, part in enumerate(parts):
            shard_name = f"model-{i + 1:05d}-of-00003.safetensors"
            save_file({n: tensors[n] for n in part}, str(path / shard_name), metadata={"format": "pt"})
            weight_map.update({n: shard_name for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(tensors, str(path / filename), metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("bits, group_size, sym, desc_act, fmt, style, shard", [
    (4, 32, True, False, "gptq", "autogptq", False),
    (4, 32, False, True, "gptq", "autogptq", True),
    (3, 32, False, False, "gptq", "gptqmodel", False),
    (2, -1, True, True, "gptq_v2", "gptqmodel", True),
    (8, 32, False, True, "gptq_v2", "gptqmodel", False),
    (4, 64, False, False, "gptq", "optimum", True),
    (3, 32, True, True, "gptq", "optimum", False),
])
def test_load_peer_checkpoint(tmp_path, bits, group_size, sym, desc_act, fmt, style, shard):
    reference = write_peer_checkpoint(tmp_path / "ckpt", tiny_llama(), bits, group_size, sym, desc_act, fmt, style,
                                      shard)
    model = load(tmp_path / "ckpt")
    q = model.model.layers[1].mlp.up_proj
    assert (q.bits, q.group_size, q.checkpoint_format) == (bits, group_size, fmt)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-5)


def test_load_peer_qwen2_bias_and_old_autogptq_filename(tmp_path):
    # Old AutoGPTQ files are named gptq_model-4bit-128g.safetensors; Qwen2 adds q/k/v biases.
    reference = write_peer_checkpoint(tmp_path / "ckpt", tiny_qwen2(), 4, 32, False, False, "gptq", "autogptq",
                                      False, filename="gptq_model-4bit-32g.safetensors")
    model = load(tmp_path / "ckpt")
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_packer_matches_documented_bit_positions(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=(64, 3))
    words = ref.pack_along_rows(values, bits)
    assert words.dtype == np.int32 and words.shape == (64 * bits // 32, 3)
    assert np.array_equal(ref.unpack_along_rows(words, bits, 64), values)
    if bits != 3:  # value j of a word at bits*j, first value in the low bits
        per = 32 // bits
        w0 = sum(int(values[j, 0]) << (bits * j) for j in range(per))
        assert int(words[0, 0]) & 0xFFFFFFFF == w0
    else:  # the straddling values 10 and 21 as GUIDE.md spells them out
        v = np.zeros((32, 1), dtype=np.int64)
        v[10, 0] = 0b101
        v[21, 0] = 0b110
        w = ref.pack_along_rows(v, 3).view(np.uint32)[:, 0]
        assert [int(x) for x in w] == [0b01 << 30, 0b1 | (0b0 << 31), 0b11]


# ---------------------------------------------------------------------------------------------
# corrupt and inconsistent checkpoints
# ---------------------------------------------------------------------------------------------
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good")
    save(quantize_rtn(tiny_llama(), bits=4, group_size=32), path)
    return path


@pytest.fixture
def ckpt(good_checkpoint, tmp_path) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, path)
    return path


def edit_tensors(path: Path, fn) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def edit_config(path: Path, fn, name: str = "config.json") -> None:
    config = json.loads((path / name).read_text())
    fn(config)
    (path / name).write_text(json.dumps(config))


def expect_error(path: Path, *fragments: str) -> None:
    with pytest.raises(ValueError) as info:
        load(path)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("tensor", [f"{Q}.scales", f"{Q}.qzeros", "model.norm.weight", "lm_head.weight"])
def test_missing_tensor(ckpt, tensor):
    edit_tensors(ckpt, lambda t: t.pop(tensor))
    expect_error(ckpt, "model.safetensors", tensor, "missing")


@pytest.mark.parametrize("tensor, shape", [
    (f"{Q}.qweight", (9, 64)),       # rows must be in * bits / 32 = 8
    (f"{Q}.scales", (2, 63)),        # [G, out]
    (f"{Q}.qzeros", (3, 8)),
    (f"{Q}.g_idx", (65,)),
    ("model.embed_tokens.weight", (127, 64)),
])
def test_wrong_shape(ckpt, tensor, shape):
    def change(t):
        t[tensor] = torch.zeros(shape, dtype=t[tensor].dtype)
    edit_tensors(ckpt, change)
    expect_error(ckpt, "model.safetensors", tensor, "shape")


@pytest.mark.parametrize("tensor, dtype", [
    (f"{Q}.qweight", torch.int64), (f"{Q}.qweight", torch.float32), (f"{Q}.qzeros", torch.int16),
    (f"{Q}.scales", torch.int32), ("model.norm.weight", torch.int32),
])
def test_wrong_dtype(ckpt, tensor, dtype):
    edit_tensors(ckpt, lambda t: t.update({tensor: t[tensor].to(dtype)}))
    expect_error(ckpt, "model.safetensors", tensor, "dtype")


def test_g_idx_out_of_range(ckpt):
    edit_tensors(ckpt, lambda t: t[f"{Q}.g_idx"].fill_(5))
    expect_error(ckpt, "model.safetensors", f"{Q}.g_idx")


@pytest.mark.parametrize("change, fragment", [
    (lambda c: c["quantization_config"].update(bits=5), "bits"),
    (lambda c: c["quantization_config"].update(checkpoint_format="marlin"), "checkpoint_format"),
    (lambda c: c["quantization_config"].update(quant_method="awq"), "awq"),
    (lambda c: c["quantization_config"].update(group_size=0), "group_size"),
])
def test_bad_quantization_config(ckpt, change, fragment):
    edit_config(ckpt, change)
    expect_error(ckpt, "config.json", fragment)


def test_group_size_disagrees_with_tensors(ckpt):
    edit_config(ckpt, lambda c: c["quantization_config"].update(group_size=16))  # scales then need 4 groups
    expect_error(ckpt, "model.safetensors", "qzeros", "shape", "group_size=16")


def test_no_quantization_config(ckpt):
    edit_config(ckpt, lambda c: c.pop("quantization_config"))
    (ckpt / "quantize_config.json").unlink()
    expect_error(ckpt, "config.json", "quantization_config")


def test_quantize_config_json_only(ckpt):  # AutoGPTQ style: the settings come from quantize_config.json
    edit_config(ckpt, lambda c: c.pop("quantization_config"))
    model = load(ckpt)
    assert model.model.layers[0].mlp.gate_proj.bits == 4


def test_truncated_safetensors(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    expect_error(ckpt, str(file))


def test_garbage_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file at all")
    expect_error(ckpt, "model.safetensors")


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    expect_error(ckpt, "model.safetensors")


def test_index_points_at_missing_shard(tmp_path):
    save(quantize_rtn(tiny_llama()), tmp_path, max_shard_size="30KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    expect_error(tmp_path, "model.safetensors.index.json", shard.name)


def test_index_disagrees_with_shard(tmp_path):
    save(quantize_rtn(tiny_llama()), tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(tmp_path, "model.safetensors.index.json", name, files[1])


def test_unexpected_tensors_warn(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3),
                                           "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}))
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.extra\.weight"):
        model = load(ckpt)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)


def test_qweight_on_non_linear(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"model.norm.qweight": torch.zeros(8, 64, dtype=torch.int32)}))
    expect_error(ckpt, "model.safetensors", "model.norm.qweight", "RMSNorm")


def test_missing_g_idx_means_sequential_groups(ckpt, good_checkpoint):
    edit_tensors(ckpt, lambda t: t.pop(f"{Q}.g_idx"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(logits(load(ckpt)), logits(load(good_checkpoint)))
    edit_config(ckpt, lambda c: c["quantization_config"].update(desc_act=True))
    expect_error(ckpt, "model.safetensors", f"{Q}.g_idx")
