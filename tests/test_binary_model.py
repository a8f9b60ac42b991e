"""slimformer.binary.binarize / freeze on tiny random BERT, Llama (GQA) and GPT-2 models: structure,
gradients, masks (causal, padding), output_attentions, BiPFT, freeze equivalence, state_dict."""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from slimformer.binary import BinarizeConfig, BinaryTrainLinear, binarize, freeze  # noqa: E402
from slimformer.binary.attention import BinaryAttention  # noqa: E402
from slimformer.nn import BinaryLinear  # noqa: E402

ARCHS = ["bert", "llama", "gpt2"]
VOCAB = 100


def make(arch: str) -> nn.Module:
    if arch == "bert":
        cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=VOCAB, max_position_embeddings=64)
        model = BertModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                         eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    return model


def output(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    out = model(input_ids=ids, **kw)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None \
        else out.logits


def calibrate(model: nn.Module, probs_scale: float | None = 0.05) -> None:
    """Initialise every quantizer from one batch; then (optionally) set the attention-probability
    scales small: random models attend almost uniformly (p ~ 1/S), which the default init
    (4 * mean p) binarizes to all zeros, hiding any masking bug."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1234)
        model(input_ids=torch.randint(0, VOCAB, (2, 9), generator=gen))
        if probs_scale is not None:
            for m in model.modules():
                if isinstance(m, BinaryAttention):
                    m.probs.scale.fill_(probs_scale)


def binarized_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, BinaryTrainLinear)]


@pytest.mark.parametrize("activations", ["fp", "binary"])
@pytest.mark.parametrize("arch", ARCHS)
def test_binarize_structure_and_gradients(arch, activations):
    model = make(arch)
    plain = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, transformers.pytorch_utils.Conv1D))}
    binarize(model, activations=activations)
    assert isinstance(model.slimformer_binary_config, BinarizeConfig)
    assert model.slimformer_binary_config.binarize_attention == (activations == "binary")
    names = set(binarized_linears(model))
    per_block = {"bert": 6, "llama": 7, "gpt2": 4}[arch]
    assert len(names) == 2 * per_block
    # embeddings, lm_head, pooler stay full precision
    assert not any(k in n for n in names for k in ("embed", "wte", "lm_head", "pooler"))
    assert {n for n in plain if "pooler" in n or "lm_head" in n} <= {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # tied weights untouched
    # random models attend almost uniformly (p ~ 1/7 here): with a = 0.2, p binarizes to a and lies
    # where the STE passes gradients (0 < p < a), so Q, K and V all get gradients
    calibrate(model, probs_scale=0.2)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 7))
    y = output(model, ids)
    y.float().pow(2).mean().backward()
    for n in names:
        layer = model.get_submodule(n)
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, n
        if activations == "binary":
            assert layer.input_quantizer.scale.grad is not None, n
            assert layer.input_quantizer.shift.grad is not None, n
    attn = [m for m in model.modules() if isinstance(m, BinaryAttention)]
    assert len(attn) == (2 if activations == "binary" else 0)
    for m in attn:
        for q in (m.query, m.key, m.value):
            assert q.scale.grad is not None
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(output(model, ids)).all()


def test_filter_fn_is_respected():
    model = make("llama")
    seen = []

    def only_mlp(module, fqn):
        seen.append(fqn)
        return ".mlp." in fqn

    binarize(model, filter_fn=only_mlp)
    assert len(seen) == 14 and all(f.startswith("model.layers.") for f in seen)
    names = binarized_linears(model)
    assert len(names) == 6 and all(".mlp." in n for n in names)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


@pytest.mark.parametrize("activations", ["fp", "binary"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_mask_is_preserved(arch, activations):
    model = make(arch)
    binarize(model, activations=activations, binarize_attention=True)
    assert model.config._attn_implementation == "slimformer_binary"
    model.eval()
    calibrate(model)
    ids = torch.randint(0, VOCAB, (2, 8))
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % VOCAB
    earlier = ids.clone()
    earlier[:, 0] = (earlier[:, 0] + 1) % VOCAB
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
        y, y_later, y_earlier = out.logits, output(model, later), output(model, earlier)
    assert torch.equal(y[:, :-1], y_later[:, :-1])  # a future token changes nothing before it
    assert not torch.equal(y[:, 1:], y_earlier[:, 1:])  # ... while a past token does (non-trivial attention)
    for p in out.attentions:
        assert p.shape == (2, 4, 8, 8)
        assert torch.all(p.triu(1) == 0)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 8))


@pytest.mark.parametrize("activations", ["fp", "binary"])
def test_bert_padding_mask_is_respected(activations):
    model = make("bert")
    binarize(model, activations=activations, binarize_attention=True)
    model.eval()
    calibrate(model)
    ids = torch.randint(1, VOCAB, (2, 6))
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 3)], dim=1).long()
    with torch.no_grad():
        y = output(model, ids)
        y_pad = output(model, padded, attention_mask=mask)
        y_unmasked = output(model, padded)
        probs = model(input_ids=padded, attention_mask=mask, output_attentions=True).attentions
    torch.testing.assert_close(y_pad[:, :6], y, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y_unmasked[:, :6], y, rtol=1e-4, atol=1e-5)
    assert all(torch.all(p[..., 6:] == 0) for p in probs)


def test_output_attentions_binary_probs():
    model = make("gpt2")
    binarize(model, activations="binary", attention_probs_output="binary")
    model.eval()
    calibrate(model, probs_scale=0.2)
    with torch.no_grad():
        probs = model(input_ids=torch.randint(0, VOCAB, (1, 6)), output_attentions=True).attentions
    assert len(probs) == 2
    for p in probs:
        assert all(v == 0.0 or v == pytest.approx(0.2) for v in torch.unique(p).tolist())


@pytest.mark.parametrize("arch", ARCHS)
def test_bipft_starts_as_bit_and_learns(arch):
    torch.manual_seed(0)
    base = make(arch)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    bit = make(arch)
    bit.load_state_dict(state)
    binarize(base, activations="binary", bipft=True)
    binarize(bit, activations="binary", bipft=False)
    ids = torch.randint(0, VOCAB, (2, 7))
    base.eval(), bit.eval()
    calibrate(bit, probs_scale=0.2), calibrate(base, probs_scale=0.2)
    with torch.no_grad():
        torch.testing.assert_close(output(base, ids), output(bit, ids))  # zero corrections at init
    base.train()
    output(base, ids).float().pow(2).mean().backward()
    a = next(m for m in base.modules() if isinstance(m, BinaryAttention))
    assert a.bipft
    for name in ("q_p", "k_p"):
        assert getattr(a, name).weight.grad.abs().sum() > 0, name
    assert a.v_w.grad.abs().sum() > 0
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, BinaryAttention):
                m.q_p.weight.normal_(std=0.5)
                m.k_p.weight.normal_(std=0.5)
                m.v_w.normal_(std=0.5)
    base.eval()
    with torch.no_grad():
        assert not torch.allclose(output(base, ids), output(bit, ids))


def test_bipft_with_kv_cache_raises():
    model = make("llama")
    binarize(model, bipft=True, binarize_attention=True)
    model.eval()
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)  # a prefill sees every key: fine
        with pytest.raises(NotImplementedError, match="use_cache=False"):
            model(input_ids=ids[:, :1], cache=out.cache, use_cache=True)


@pytest.mark.parametrize("bipft", [False, True], ids=["bit", "bipft"])
@pytest.mark.parametrize("activations", ["fp", "binary"])
@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_matches_eval_outputs_and_round_trips(arch, activations, bipft):
    model = make(arch)
    binarize(model, activations=activations, binarize_attention=True, bipft=bipft)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 9))
    output(model, ids).float().pow(2).mean().backward()  # first (training) batch initialises the scales
    model.eval()
    calibrate(model, probs_scale=0.05)
    with torch.no_grad():
        expect = output(model, ids)
    n_linear = len(binarized_linears(model))
    freeze(model)
    assert binarized_linears(model) == []
    frozen = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    assert len(frozen) == n_linear and all(m.activations == activations for m in frozen)
    assert all(not p.requires_grad for m in model.modules() if isinstance(m, BinaryAttention)
               for p in m.parameters())
    with torch.no_grad():
        got = output(model, ids)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)

    fresh = make(arch)
    binarize(fresh, activations=activations, binarize_attention=True, bipft=bipft)
    freeze(fresh, allow_uninitialized=True)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(output(fresh, ids), got, rtol=0, atol=0)


def test_freeze_default_fp_config_llama():
    model = make("llama")
    binarize(model)  # W1A-fp, attention untouched (model keeps its attention implementation)
    assert model.config._attn_implementation != "slimformer_binary"
    model.eval()
    ids = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        expect = output(model, ids)
        freeze(model)
        torch.testing.assert_close(output(model, ids), expect, rtol=1e-4, atol=1e-5)


def test_freeze_needs_calibration():
    model = make("gpt2")
    binarize(model, activations="binary")
    with pytest.raises(RuntimeError, match="never initialised"):
        freeze(model)


def test_bad_input():
    opt = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                                   vocab_size=VOCAB, word_embed_proj_dim=32))
    with pytest.raises(ValueError, match="supports these architectures: bert .*llama.*gpt2.*model_type='opt'"):
        binarize(opt)
    with pytest.raises(ValueError, match="supports these architectures"):
        binarize(nn.Sequential(nn.Linear(4, 4)))
    model = make("bert")
    with pytest.raises(ValueError, match="needs binarize_attention=True"):
        binarize(model, bipft=True)
    with pytest.raises(ValueError, match="activations must be one of"):
        binarize(model, activations="int4")
    with pytest.raises(ValueError, match="expects a model prepared"):
        freeze(model)
    binarize(model)
    with pytest.raises(ValueError, match="already binarized"):
        binarize(model)


@pytest.mark.parametrize("activations", ["fp", "binary"])
def test_bf16_train_and_freeze(activations):
    model = make("llama").to(torch.bfloat16)
    binarize(model, activations=activations, binarize_attention=True)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 7))
    y = output(model, ids)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).mean().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.dtype == torch.bfloat16
    model.eval()
    calibrate(model)
    with torch.no_grad():
        expect = output(model, ids).float()
        freeze(model)
        assert all(m.alpha.dtype == torch.float32 for m in model.modules() if isinstance(m, BinaryLinear))
        got = output(model, ids).float()
    assert float((got - expect).norm() / expect.norm()) < 2e-2


@pytest.mark.parametrize("activations", ["fp", "binary"])
def test_frozen_model_compiles_fullgraph(activations):
    """A frozen binary model runs under torch.compile(fullgraph=True): the ops' fake impls and the
    binarized attention trace without graph breaks, and the compiled model gives the same output."""
    torch._dynamo.reset()
    model = make("llama").eval()
    binarize(model, activations=activations)
    calibrate(model)
    freeze(model)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expect = output(model, ids, use_cache=False)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = output(compiled, ids, use_cache=False)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
