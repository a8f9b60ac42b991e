"""Model-level GPTQ (slimformer.gptq.quantize) on tiny random Hugging Face models: every block
linear becomes a QuantLinear, GPTQ beats round-to-nearest on the model output, true-sequential
steps follow the block's data flow, and replaying finished parts changes nothing."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import slimformer.gptq.quantizer as quantizer
from slimformer import QuantLinear
from slimformer.gptq import find_blocks, quantize

VOCAB = 96
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                               bos_token_id=0, eos_token_id=0)),
    "opt": lambda: OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                            vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=64)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)),
    "bert": lambda: BertModel(BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64)),
}
STEPS = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "bert": [["attention.self.query", "attention.self.key", "attention.self.value"], ["attention.output.dense"],
             ["intermediate.dense"], ["output.dense"]],
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def tokens(n: int = 12, seq: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def relative_error(model, reference, ids) -> float:
    got, want = output(model, ids), output(reference, ids)
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("name", list(MODELS))
def test_gptq_replaces_block_linears_and_beats_rtn(name):
    reference, ids = make(name), tokens()
    evaluation = tokens(4, 32, seed=7)
    errors = {}
    for method in ("rtn", "gptq"):
        model = make(name)
        assert quantize(model, ids, bits=3, group_size=32, method=method, progress=False) is model
        _, blocks = find_blocks(model)
        quantized = [m for m in blocks.modules() if isinstance(m, QuantLinear)]
        assert quantized and not any(isinstance(m, torch.nn.Linear) for m in blocks.modules())
        assert not any(isinstance(m, QuantLinear) for n, m in model.named_modules() if "lm_head" in n)
        assert model.config.quantization_config["bits"] == 3
        assert model.config.quantization_config["quant_method"] == "gptq"
        errors[method] = relative_error(model, reference, evaluation)
    assert errors["gptq"] < errors["rtn"], errors


@pytest.mark.parametrize("name", list(STEPS))
def test_true_sequential_steps_follow_the_data_flow(name):
    model, ids = make(name), tokens(2)
    _, blocks = find_blocks(model)
    inputs = quantizer._capture_block_inputs(model, blocks[0], quantizer._batches(ids, 2), torch.device("cpu"))
    assert [s.names for s in quantizer._plan_steps(blocks[0], inputs, True)] == STEPS[name]
    (single,) = quantizer._plan_steps(blocks[0], inputs, False)
    assert single.names == [n for step in STEPS[name] for n in step]


def test_replaying_finished_parts_changes_nothing(monkeypatch):
    ids = tokens(10, 24)
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(quantizer._Replay, "enabled", enabled)
        model = make("llama")
        quantize(model, ids, bits=3, group_size=16, batch_size=3, progress=False)
        runs.append(output(model, ids))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("options", [
    dict(desc_act=True), dict(desc_act=True, static_groups=True), dict(group_size=-1, sym=False),
    dict(true_sequential=False), dict(checkpoint_format="gptq_v2", sym=False), dict(bits=2, group_size=16),
    dict(bits=8), dict(sym=False),
])
def test_options_produce_a_working_model(options):
    reference, ids = make("llama"), tokens()
    model = make("llama")
    kwargs = dict(bits=4, group_size=32) | options
    quantize(model, ids, progress=False, **kwargs)
    assert relative_error(model, reference, ids) < {2: 0.5, 3: 0.3}.get(kwargs["bits"], 0.15)
    report = model.slimformer_quantize_report
    assert len(report.layers) == 14 and all(layer.loss >= 0 for layer in report.layers)
    config = model.config.quantization_config
    assert all(config[k] == v for k, v in options.items())


def test_examples_may_be_a_list_of_different_lengths():
    model = make("llama")
    examples = [torch.randint(0, VOCAB, (n,)) for n in (16, 32, 16, 20)]
    quantize(model, examples, bits=4, group_size=32, progress=False)
    assert torch.isfinite(output(model, tokens(2))).all()


def test_model_state_is_restored():
    model = make("gpt2").train()
    quantize(model, tokens(4), bits=4, group_size=32, progress=False)
    assert model.training


@pytest.mark.parametrize("call,match", [
    (lambda m: quantize(m, None, progress=False), "calibration examples"),
    (lambda m: quantize(m, tokens().float(), progress=False), "integer token ids"),
    (lambda m: quantize(m, torch.zeros(0, 8, dtype=torch.long), progress=False), "shape|non-empty"),
    (lambda m: quantize(m, tokens(), bits=5, progress=False), "unsupported bits"),
    (lambda m: quantize(m, tokens(), method="awq", progress=False), "method must be"),
    (lambda m: quantize(m, tokens(), damp_percent=0, progress=False), "damp_percent"),
    (lambda m: quantize(quantize(m, method="rtn", progress=False), method="rtn", progress=False), "already has"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(make("llama"))


def test_rtn_needs_no_examples_and_matches_quantlinear_from_linear():
    model = make("llama")
    layer = model.model.layers[0].mlp.down_proj
    expected = QuantLinear.from_linear(layer, bits=4, group_size=32, sym=True)
    quantize(model, method="rtn", bits=4, group_size=32, progress=False)
    got = model.model.layers[0].mlp.down_proj
    for buf in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(got, buf), getattr(expected, buf)), buf


@pytest.mark.parametrize("name,options", [("llama", dict(desc_act=True, sym=False)), ("gpt2", dict(group_size=-1)),
                                          ("qwen2", dict(checkpoint_format="gptq_v2", bits=3))])
def test_quantize_save_load_round_trip_gives_identical_logits(tmp_path, name, options):
    from slimformer.gptq import load, save

    model = make(name)
    quantize(model, tokens(), **(dict(bits=4, group_size=32) | options), progress=False)
    save(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    ids = tokens(3, 20, seed=5)
    assert torch.equal(output(loaded, ids), output(model, ids))
    assert loaded.config.quantization_config == model.config.quantization_config


def test_clipping_search_is_recorded_in_the_config():
    model = make("llama")
    quantize(model, tokens(), bits=3, group_size=32, mse=2.4, progress=False)
    assert model.config.quantization_config["mse"] == 2.4


def test_offloaded_meta_weights_are_refused_clearly():
    model = make("llama")
    down = model.model.layers[1].mlp.down_proj
    down.weight = torch.nn.Parameter(torch.empty_like(down.weight, device="meta"))
    with pytest.raises(ValueError, match="block 1 has parameters on the meta device"):
        quantize(model, tokens(), bits=4, group_size=32, progress=False)


@pytest.mark.parametrize("name,method", [("gpt2", "gptq"), ("llama", "rtn")])
def test_lm_head_is_quantized_when_asked_and_round_trips(tmp_path, name, method):
    from slimformer.gptq import load, save

    model = make(name)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    quantize(model, tokens(), bits=4, group_size=32, lm_head=True, method=method, progress=False)
    assert isinstance(model.get_output_embeddings(), QuantLinear)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)  # a tied weight is untied, not rounded
    assert model.config.quantization_config["lm_head"] is True and not model.config.tie_word_embeddings
    assert relative_error(model, make(name), tokens(3, seed=9)) < 0.2
    save(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    assert isinstance(loaded.get_output_embeddings(), QuantLinear)
    assert torch.equal(output(loaded, tokens(2)), output(model, tokens(2)))


def test_lm_head_needs_a_linear_output_layer():
    with pytest.raises(ValueError, match="no linear output layer"):
        quantize(make("bert"), tokens(), lm_head=True, progress=False)


def test_saving_asymmetric_v1_warns_about_gptqmodel(tmp_path):
    from slimformer.gptq import save

    model = quantize(make("llama"), method="rtn", sym=False, progress=False)
    with pytest.warns(UserWarning, match="gptq_v2"):
        save(model, tmp_path / "v1")
    v2 = quantize(make("llama"), method="rtn", sym=False, checkpoint_format="gptq_v2", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save(v2, tmp_path / "v2")
