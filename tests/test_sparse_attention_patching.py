"""sparsify / restore on tiny random-weight transformers models (no downloads).

The reference for a sparse pattern is the *unpatched* model in eager mode given the pattern's
explicit mask (``pattern.dense_mask`` & padding) as a 4D additive mask: an independent route to the
same attention, O(n^2), that shares no code with the patching."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slimformer.attention import (BigBird, BlockLayout, SlidingWindow, SparseMaskInfo,  # noqa: E402
                                  is_sparsified, restore, sparsify)
from slimformer.attention.patching import ATTN_IMPLEMENTATION, PATTERN_ATTR  # noqa: E402

VOCAB = 97
SEQ = 150  # > 2 tiles of 64, not a multiple of any block size


def _make(arch: str, **overrides):
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
        kw = dict(common, vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=512)
        if arch == "mistral":
            kw["sliding_window"] = None
        cfg = cls[0](**{**kw, **overrides})
        model = cls[1](cfg)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                      **overrides)
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch in ("bert", "roberta"):
        cls = {"bert": (transformers.BertConfig, transformers.BertModel),
               "roberta": (transformers.RobertaConfig, transformers.RobertaModel)}[arch]
        cfg = cls[0](**{**common, "vocab_size": VOCAB, "max_position_embeddings": 520, **overrides})
        model = cls[1](cfg, add_pooling_layer=False)
    elif arch == "vit":
        cfg = transformers.ViTConfig(**{**common, "image_size": 48, "patch_size": 4, "num_channels": 3,
                                        **overrides})  # 144 patches + CLS = 145 tokens
        model = transformers.ViTModel(cfg, add_pooling_layer=False)
    else:
        raise AssertionError(arch)
    return model.eval()


CAUSAL = {"llama": True, "mistral": True, "qwen2": True, "gpt2": True, "bert": False, "roberta": False, "vit": False}
ARCHS = list(CAUSAL)


def _inputs(arch: str, batch: int = 2, seq: int = SEQ, pad: str | None = None, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 48, 48, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad == "right":
        mask[1, seq - 37:] = 0
    elif pad == "left":
        mask[1, :41] = 0
    out = {"input_ids": ids}
    if pad is not None:
        out["attention_mask"] = mask
    return out


def _seq_len(arch: str, inputs: dict) -> int:
    return 145 if arch == "vit" else inputs["input_ids"].shape[1]


def _out(model, inputs, **kw) -> torch.Tensor:
    o = model(**inputs, **kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _dense_masked(model, arch, pattern, inputs) -> torch.Tensor:
    """The unpatched model (eager) with the pattern's explicit mask as a 4D additive mask."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    s = _seq_len(arch, inputs)
    allowed = pattern.dense_mask(s, causal=CAUSAL[arch], num_heads=model.config.num_attention_heads)[None]
    if "attention_mask" in inputs:
        allowed = allowed & inputs["attention_mask"].bool()[:, None, None, :]
    additive = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return _out(ref, {**inputs, "attention_mask": additive})


def _valid_rows(inputs) -> torch.Tensor | None:
    m = inputs.get("attention_mask")
    return None if m is None else m.bool()


def _assert_close(a, b, rows=None, tol=2e-5):
    if rows is not None:
        a, b = a[rows], b[rows]
    err = float((a - b).norm() / b.norm())
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_full_window_equals_dense(arch):
    model = _make(arch)
    inputs = _inputs(arch, pad=None if arch == "vit" else "right")
    with torch.no_grad():
        dense = _out(model, inputs)
        sparsify(model, SlidingWindow(4096))
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        out = _out(model, inputs)
    assert torch.isfinite(out).all()
    _assert_close(out, dense, _valid_rows(inputs))


def _patterns(arch, heads):
    g = torch.Generator().manual_seed(3)
    layout = torch.rand(heads, 5, 5, generator=g) < 0.35
    layout |= torch.eye(5, dtype=torch.bool)
    return {
        "window": SlidingWindow(24),
        "window+global": SlidingWindow(16, global_tokens=(0, 70)),
        "bigbird": BigBird(block_size=16, window_blocks=3, global_blocks=1, random_blocks=2, seed=5),
        "layout": BlockLayout(32, layout),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_equals_dense_masked(arch):
    model = _make(arch)
    inputs = _inputs(arch)
    for name, pattern in _patterns(arch, model.config.num_attention_heads).items():
        with torch.no_grad():
            ref = _dense_masked(model, arch, pattern, inputs)
            out = _out(sparsify(model, pattern), inputs)
        _assert_close(out, ref)
        restore(model)


@pytest.mark.parametrize("arch,pad", [("llama", "right"), ("llama", "left"), ("gpt2", "left"), ("bert", "right"),
                                      ("roberta", "left"), ("qwen2", "left")])
def test_padding(arch, pad):
    model = _make(arch)
    inputs = _inputs(arch, pad=pad)
    pattern = SlidingWindow(20, global_tokens=(50,)) if arch != "qwen2" else BigBird(block_size=16, random_blocks=1)
    with torch.no_grad():
        ref = _dense_masked(model, arch, pattern, inputs)
        out = _out(sparsify(model, pattern), inputs)
    assert torch.isfinite(out).all(), "a fully padded query must give finite outputs"
    _assert_close(out, ref, _valid_rows(inputs))


@pytest.mark.parametrize("pattern", [SlidingWindow(24), BigBird(block_size=16, random_blocks=2),
                                     SlidingWindow(8, causal=None, global_tokens=(3,))])
def test_causal_preserved(pattern):
    model = sparsify(_make("llama"), pattern)
    a = _inputs("llama", batch=1)
    b = {"input_ids": a["input_ids"].clone()}
    b["input_ids"][0, 100] = (b["input_ids"][0, 100] + 1) % VOCAB
    with torch.no_grad():
        oa, ob = _out(model, a), _out(model, b)
    assert torch.equal(oa[:, :100], ob[:, :100])
    assert not torch.allclose(oa[:, 100:], ob[:, 100:])


def test_forced_bidirectional_on_decoder_and_causal_on_encoder():
    for arch, causal in (("llama", False), ("bert", True)):
        model = _make(arch)
        pattern = SlidingWindow(12, causal=causal)
        inputs = _inputs(arch, batch=1, seq=90)
        with torch.no_grad():
            allowed = pattern.dense_mask(90)[None]
            additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
            ref_model = copy.deepcopy(model)
            ref_model.set_attn_implementation("eager")
            ref = _out(ref_model, {**inputs, "attention_mask": additive})
            out = _out(sparsify(model, pattern), inputs)
        _assert_close(out, ref)


def test_gqa_heads():
    model = _make("llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    inputs = _inputs("llama", pad="left")
    layout = (torch.rand(8, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.4) | torch.eye(5, dtype=torch.bool)
    for pattern in (SlidingWindow(30), BlockLayout(32, layout)):
        with torch.no_grad():
            ref = _dense_masked(model, "llama", pattern, inputs)
            out = _out(sparsify(model, pattern), inputs)
        _assert_close(out, ref, _valid_rows(inputs))


@pytest.mark.parametrize("arch,pattern", [
    ("llama", SlidingWindow(16, global_tokens=(0,))),
    ("llama", BlockLayout(16, torch.tril(torch.ones(8, 8, dtype=torch.bool)) & ~torch.tril(torch.ones(8, 8, dtype=torch.bool), -3))),
    ("gpt2", SlidingWindow(24)),
])
def test_kv_cache_decode_equals_recompute(arch, pattern):
    model = sparsify(_make(arch), pattern)
    inputs = _inputs(arch, batch=2, seq=70, pad="left")
    kw = dict(max_new_tokens=25, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kw)
        full = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits):
        assert torch.isfinite(a).all()
        _assert_close(a, b, tol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_cache_generate_equals_dynamic(arch):
    """generate(cache_implementation="static") precomputes masks for a fixed-size cache; the sparse
    route must get the padding mask and the cache offsets from it, and decode the same tokens."""
    model = sparsify(_make(arch), SlidingWindow(16))
    inputs = _inputs(arch, batch=2, seq=40, pad="left")
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **kw)
        static = model.generate(**inputs, cache_implementation="static", **kw)
    assert torch.equal(dynamic, static)
    restore(model)
    assert "create_masks_for_generate" not in model.__dict__


def test_step_by_step_decode_offsets():
    """One token at a time through the cache: each step's logits equal the full forward's last row."""
    pattern = SlidingWindow(10, global_tokens=(2,))
    model = sparsify(_make("llama"), pattern)
    ids = _inputs("llama", batch=1, seq=140)["input_ids"]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :100], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(100, 140):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    _assert_close(torch.cat(steps, 1), full, tol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2", "vit"])
def test_restore_is_bit_identical(arch):
    model = _make(arch)
    inputs = _inputs(arch, pad=None if arch == "vit" else "right")
    before_impl = model.config._attn_implementation
    with torch.no_grad():
        before = _out(model, inputs)
        sparsify(model, SlidingWindow(16))
        sparsify(model, BigBird(block_size=16))  # changing the pattern keeps the original to restore
        assert is_sparsified(model)
        sparse = _out(model, inputs)
        restore(model)
        after = _out(model, inputs)
    assert not torch.equal(before, sparse)
    assert torch.equal(before, after)
    assert model.config._attn_implementation == before_impl and not is_sparsified(model)
    assert not any(PATTERN_ATTR in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_gradients_match_dense_masked(arch):
    model = _make(arch)
    inputs = _inputs(arch, pad="right")
    pattern = SlidingWindow(20, global_tokens=(0,))
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    allowed = pattern.dense_mask(SEQ, causal=CAUSAL[arch], num_heads=4)[None] & inputs["attention_mask"].bool()[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    rows = _valid_rows(inputs)[..., None]
    sparsify(model, pattern)
    grads = []
    for m, kw in ((model, inputs), (ref, {**inputs, "attention_mask": additive})):
        m.zero_grad()
        out = _out(m, kw)
        # a fixed random projection (a sum of squares of LayerNorm outputs would have ~0 gradient)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        (out * rows * weight).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for n in grads[1]:
        assert torch.isfinite(grads[0][n]).all(), n
        if n.endswith("key.bias"):  # softmax ignores q.b_k (the same for every key): its gradient is ~0, noise
            continue
        _assert_close(grads[0][n], grads[1][n], tol=1e-4)


def test_training_dropout_policy():
    model = sparsify(_make("bert", attention_probs_dropout_prob=0.1), SlidingWindow(8)).train()
    inputs = _inputs("bert", batch=1, seq=40)
    with pytest.raises(NotImplementedError, match="attention dropout"):
        _out(model, inputs)
    sparsify(model, SlidingWindow(8), ignore_attention_dropout=True)
    assert torch.isfinite(_out(model, inputs)).all()
    model.eval()
    sparsify(model, SlidingWindow(8))
    _out(model, inputs)  # eval mode: no dropout, no error


def test_filter_fn_keeps_some_layers_dense():
    model = _make("llama")
    inputs = _inputs("llama", batch=1)
    with torch.no_grad():
        dense = _out(model, inputs)
        sparsify(model, SlidingWindow(4), filter_fn=lambda m, fqn: False)
        _assert_close(_out(model, inputs), dense)
        sparsify(model, SlidingWindow(4), filter_fn=lambda m, fqn: ".layers.1." in f".{fqn}.")
        assert getattr(model.model.layers[0].self_attn, PATTERN_ATTR) is None
        assert not torch.allclose(_out(model, inputs), dense)


def test_mask_function_hands_no_square_mask():
    """What the attention function receives: the padding mask [B, kv] and the cache offset, nothing n x n."""
    seen = []
    from slimformer.attention import patching

    model = sparsify(_make("llama"), SlidingWindow(8))
    original = patching.sparse_attention_forward

    def spy(module, q, k, v, mask, **kw):
        seen.append(mask)
        return original(module, q, k, v, mask, **kw)

    transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, spy)
    try:
        inputs = _inputs("llama", batch=2, seq=30, pad="left")
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            model(input_ids=inputs["input_ids"][:, -1:], attention_mask=torch.cat(
                [inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1), cache=out.past_key_values)
    finally:
        patching.register()
    assert all(isinstance(m, SparseMaskInfo) for m in seen)
    assert seen[0].causal and seen[0].q_offset == 0 and tuple(seen[0].key_mask.shape) == (2, 30)
    assert seen[-1].q_offset == 30 and seen[-1].kv_len == 31 and seen[-1].q_len == 1


# -- errors ---------------------------------------------------------------------------------------------
def test_bad_patterns_raise():
    with pytest.raises(ValueError, match="window"):
        SlidingWindow(-1)
    with pytest.raises(ValueError, match="window"):
        SlidingWindow(0)
    model = sparsify(_make("llama"), BlockLayout(16, torch.ones(1, 4, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="covers 64"):
        _out(model, _inputs("llama", batch=1, seq=100))
    sparsify(model, BlockLayout(16, torch.ones(3, 8, 8, dtype=torch.bool)))
    with pytest.raises(ValueError, match="3 heads"):
        _out(model, _inputs("llama", batch=1, seq=100))
    with pytest.raises(TypeError, match="Pattern"):
        sparsify(model, "window")


def test_unsupported_models_raise():
    with pytest.raises(ValueError, match="Supported model types: bert, gpt2, llama"):
        sparsify(torch.nn.Linear(3, 3), SlidingWindow(4))
    # (Longformer and BigBird are supported through module replacement: tests/test_sparse_attention_hf_modules.py)
    cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64)
    with pytest.raises(ValueError, match="distilbert"):
        sparsify(transformers.DistilBertModel(cfg), SlidingWindow(4))
    with pytest.raises(ValueError, match="sliding window of its own"):
        sparsify(_make("mistral", sliding_window=32), SlidingWindow(4))
    with pytest.raises(ValueError, match="cross-attention"):
        sparsify(transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, add_cross_attention=True)), SlidingWindow(4))


def test_output_attentions_and_square_masks_raise():
    model = sparsify(_make("llama"), SlidingWindow(8))
    inputs = _inputs("llama", batch=1, seq=20)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(**inputs, output_attentions=True)
    with pytest.raises(ValueError, match="2D padding mask"):
        model(**inputs, attention_mask=torch.zeros(1, 1, 20, 20))


def test_plan_cached_in_inference_mode_serves_autograd():
    """Plans are cached per pattern: one first made under torch.inference_mode (an evaluation) must
    still be usable by a later forward that autograd records (training on the same lengths)."""
    pattern = SlidingWindow(16)
    model = sparsify(_make("llama"), pattern)
    inputs = _inputs("llama", batch=1, seq=80)
    with torch.inference_mode():
        _out(model, inputs)
    assert not pattern.plan(80, causal=True).row_ptr.is_inference()
    (_out(model, inputs) * torch.randn(1, 80, VOCAB)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_torch_compile_fullgraph_patched_model():
    """A patched model compiles without graph breaks (dynamo; padding included)."""
    model = sparsify(_make("llama"), SlidingWindow(16, global_tokens=(0,)))
    inputs = _inputs("llama", batch=2, seq=80, pad="left")
    with torch.no_grad():
        ref = _out(model, inputs)
        out = _out(torch.compile(model, fullgraph=True, backend="eager"), inputs)
    torch._dynamo.reset()
    assert torch.equal(out, ref)
