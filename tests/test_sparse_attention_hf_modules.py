"""sparsify / restore on Longformer and BigBird (module replacement, slimformer.attention.hf_modules),
tiny random-weight models, no downloads.

References: Longformer: the unpatched HF Longformer itself (its own chunked window + global
attention code shares nothing with the sparse kernel). BigBird: the unpatched HF model in
block_sparse mode *in training mode* with dropout 0 (the layout HF trains with, which the "model"
pattern reproduces), and HF's ``original_full`` attention given the pattern's explicit 4D mask."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slimformer.attention import BigBird, BlockLayout, SlidingWindow, is_sparsified, restore, sparsify  # noqa: E402
from slimformer.attention.hf_modules import (HFBigBirdLayout, SparseBigBirdSelfAttention,  # noqa: E402
                                             SparseLongformerSelfAttention)

VOCAB = 97
ATOL = 1e-5


def _close(a, b, rows=None, atol=ATOL):
    if rows is not None:
        a, b = a[rows], b[rows]
    err = float((a - b).abs().max())
    assert err < atol, f"max abs error {err:.2e}"


# -- Longformer ------------------------------------------------------------------------------------------
def _longformer(attention_window=(16, 32), cls=None, **kw):
    torch.manual_seed(0)
    cfg = transformers.LongformerConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": len(attention_window), "num_attention_heads": 4,
        "intermediate_size": 64, "attention_window": list(attention_window), "max_position_embeddings": 600,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **kw})
    cls = cls or (lambda c: transformers.LongformerModel(c, add_pooling_layer=False))
    return cls(cfg).eval()


def _lf_inputs(batch, seq, pad=False, globals_=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=g)}
    if pad:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, seq - seq // 4:] = 0                 # right padding
        if batch > 2:
            mask[2, :5] = 0                          # left padding
        out["attention_mask"] = mask
    if globals_ is not None:
        gm = torch.zeros(batch, seq, dtype=torch.long)
        for b, pos in enumerate(globals_):
            gm[b, list(pos)] = 1
        out["global_attention_mask"] = gm
    return out


LF_CASES = {
    "local_only": dict(batch=2, seq=203),
    "local_only_padding": dict(batch=3, seq=203, pad=True),
    "same_globals": dict(batch=2, seq=203, globals_=[(0, 70), (0, 70)]),
    "per_row_globals_padding": dict(batch=4, seq=203, pad=True, globals_=[(0, 77, 202), (3,), (10, 11, 190), ()]),
    "odd_short": dict(batch=3, seq=37, pad=True, globals_=[(0,), (), (6, 30)]),   # HF pads 37 -> 64
}


@pytest.mark.parametrize("case", list(LF_CASES))
def test_longformer_matches_hf(case):
    model = _longformer()
    inputs = _lf_inputs(**LF_CASES[case])
    ref = model(**inputs).last_hidden_state
    sparsify(model, None)
    assert all(isinstance(m.attention.self, SparseLongformerSelfAttention) for m in model.encoder.layer)
    out = model(**inputs).last_hidden_state
    assert out.shape == ref.shape
    _close(out, ref)                                  # every row, padding rows included (HF zeroes them too)


def test_longformer_masked_lm_and_window_override():
    model = _longformer(attention_window=(32, 32), cls=transformers.LongformerForMaskedLM)
    narrow = _longformer(attention_window=(16, 16), cls=transformers.LongformerForMaskedLM)
    narrow.load_state_dict(model.state_dict())
    inputs = _lf_inputs(**LF_CASES["per_row_globals_padding"])
    ref_wide, ref = model(**inputs).logits, narrow(**inputs).logits
    assert float((ref_wide - ref).abs().max()) > 1e-3   # the window matters at this length
    sparsify(model, SlidingWindow(9))                 # |i - j| < 9  ==  HF attention_window 16
    _close(model(**inputs).logits, ref, atol=3e-5)
    sparsify(model, "model")                          # back to the model's own 32
    _close(model(**inputs).logits, ref_wide, atol=3e-5)


def test_longformer_gradients_match_hf():
    model = _longformer()
    ref_model = copy.deepcopy(model)
    inputs = _lf_inputs(**LF_CASES["per_row_globals_padding"])
    proj = torch.randn(32, generator=torch.Generator().manual_seed(5))
    sparsify(model, None)
    for m in (model, ref_model):
        m.train()
        (m(**inputs).last_hidden_state * proj).square().sum().backward()
    names = 0
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        if q.grad is None or name.endswith(("key.bias", "key_global.bias")):   # softmax-invariant: ~0, noise
            continue
        assert p.grad is not None, name
        scale = float(q.grad.abs().max()) + 1e-12
        assert float((p.grad - q.grad).abs().max()) / scale < 1e-4, name
        names += "global" in name
    assert names >= 6                                 # the global projections got gradients through our path


def test_longformer_restore_bit_identical_and_weights_shared():
    model = _longformer()
    inputs = _lf_inputs(**LF_CASES["per_row_globals_padding"])
    keys = list(model.state_dict())
    originals = [layer.attention.self for layer in model.encoder.layer]
    before = model(**inputs).last_hidden_state
    sparsify(model, None)
    assert is_sparsified(model) and list(model.state_dict()) == keys
    assert model.encoder.layer[0].attention.self.query is originals[0].query
    model.train().eval()
    restore(model)
    assert not is_sparsified(model)
    assert [layer.attention.self for layer in model.encoder.layer] == originals
    assert all(not m.training for m in originals)
    assert torch.equal(model(**inputs).last_hidden_state, before)


def test_longformer_filter_fn_and_resparsify():
    model = _longformer()
    inputs = _lf_inputs(**LF_CASES["same_globals"])
    ref = model(**inputs).last_hidden_state
    sparsify(model, None, filter_fn=lambda m, fqn: fqn.startswith("encoder.layer.0."))
    kinds = [type(layer.attention.self).__name__ for layer in model.encoder.layer]
    assert kinds == ["SparseLongformerSelfAttention", "LongformerSelfAttention"]
    _close(model(**inputs).last_hidden_state, ref)
    sparsify(model, SlidingWindow(5))                 # again: every layer, another window
    assert [layer.attention.self.window for layer in model.encoder.layer] == [5, 5]
    restore(model)
    assert [type(layer.attention.self).__name__ for layer in model.encoder.layer] == ["LongformerSelfAttention"] * 2
    assert torch.equal(model(**inputs).last_hidden_state, ref)


def test_longformer_bad_patterns_and_inputs():
    model = _longformer()
    for bad, exc, match in [(BigBird(16), ValueError, "SlidingWindow"),
                            (SlidingWindow(8, causal=True), ValueError, "bidirectional"),
                            (SlidingWindow(8, global_tokens=(0,)), ValueError, "global_attention_mask"),
                            ("window", ValueError, "unknown pattern"),
                            (8, TypeError, "SlidingWindow")]:
        with pytest.raises(exc, match=match):
            sparsify(model, bad)
        assert not is_sparsified(model)
        assert type(model.encoder.layer[0].attention.self).__name__ == "LongformerSelfAttention"
    inputs = _lf_inputs(**LF_CASES["same_globals"])
    sparsify(model, None)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(**inputs, output_attentions=True)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model.encoder.layer[0].attention.self(torch.randn(1, 8, 32), attention_mask=torch.zeros(1, 1, 8, 8))
    dropout_model = _longformer(attention_probs_dropout_prob=0.1)
    sparsify(dropout_model, None)
    dropout_model.train()
    with pytest.raises(NotImplementedError, match="attention dropout"):
        dropout_model(**inputs)
    sparsify(dropout_model, None, ignore_attention_dropout=True)
    dropout_model(**inputs).last_hidden_state.sum().backward()


# -- BigBird -----------------------------------------------------------------------------------------------
def _bigbird(attention_type="block_sparse", **kw):
    torch.manual_seed(0)
    cfg = transformers.BigBirdConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "block_size": 16, "num_random_blocks": 2, "max_position_embeddings": 600,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "attention_type": attention_type, **kw})
    return transformers.BigBirdModel(cfg, add_pooling_layer=False).eval()


def _bb_inputs(batch=2, seq=200, pad=True, seed=1):   # 200 > (5 + 2*2) * 16 = 144: HF stays block_sparse
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=g)}
    if pad:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, seq - 50:] = 0
        out["attention_mask"] = mask
    return out


def _rows(inputs):
    m = inputs.get("attention_mask")
    return None if m is None else m.bool()


def test_bigbird_model_pattern_equals_hf_training_layout():
    model = _bigbird()
    inputs = _bb_inputs()
    ref = model.train()(**inputs).last_hidden_state   # HF block_sparse, training-mode random blocks
    hf_eval = model.eval()(**inputs).last_hidden_state
    sparsify(model, "model")
    layers = [layer.attention.self for layer in model.encoder.layer]
    assert all(isinstance(m, SparseBigBirdSelfAttention) and m.pattern.seed == i for i, m in enumerate(layers))
    _close(model(**inputs).last_hidden_state, ref, _rows(inputs))            # eval mode, same layout
    _close(model.train()(**inputs).last_hidden_state, ref, _rows(inputs))    # training mode
    # HF's eval mode (random slots collapsed onto block 0) is a different function
    assert float((hf_eval - ref)[_rows(inputs)].abs().max()) > 1e-4
    # and the test sees the random blocks: another seed differs
    sparsify(model, HFBigBirdLayout(16, 2, seed=7, max_seqlen=600))
    assert float((model.eval()(**inputs).last_hidden_state - ref)[_rows(inputs)].abs().max()) > 1e-4


def test_bigbird_layout_rule():
    lay = HFBigBirdLayout(16, 2, seed=0, max_seqlen=600).layout(208, 4)       # 13 blocks
    assert lay.shape == (4, 13, 13)
    assert lay[:, [0, -1]].all() and lay[:, :, [0, -1]].all()                  # global first / last
    assert (lay.sum(-1)[:, 2:-2] == 3 + 2 + 2).all()                            # window + globals + 2 random
    assert not torch.equal(lay[0], lay[1])                                      # random blocks differ per head
    assert HFBigBirdLayout(16, 2, seed=0, max_seqlen=600).layout(144, 4).all()  # short: full (HF original_full)


def _dense_masked_bigbird(model, pattern, inputs):
    """HF original_full (eager) with the pattern's explicit mask & padding as a 4D additive mask."""
    ref = copy.deepcopy(model)
    ref.set_attention_type("original_full")
    s = inputs["input_ids"].shape[1]
    allowed = pattern.dense_mask(s, causal=False, num_heads=4)[None]
    if "attention_mask" in inputs:
        allowed = allowed & inputs["attention_mask"].bool()[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return ref(**{**inputs, "attention_mask": additive}).last_hidden_state


BB_PATTERNS = {
    "bigbird": lambda: BigBird(16, random_blocks=2, seed=3),
    "window_global": lambda: SlidingWindow(20, global_tokens=(0, 100)),
    "block_layout": lambda: BlockLayout(16, (torch.rand(4, 13, 13, generator=torch.Generator().manual_seed(2)) < 0.3)
                                        | torch.eye(13, dtype=torch.bool)),
    "hf_model": lambda: HFBigBirdLayout(16, 2, seed=1, max_seqlen=600),
}


@pytest.mark.parametrize("name", list(BB_PATTERNS))
def test_bigbird_patterns_equal_dense_masked(name):
    model = _bigbird()
    pattern = BB_PATTERNS[name]()
    inputs = _bb_inputs()
    ref = _dense_masked_bigbird(model, pattern, inputs)
    sparsify(model, pattern)
    assert model.encoder.layer[0].attention.self.hf_attention_type == "block_sparse"
    _close(model(**inputs).last_hidden_state, ref, _rows(inputs))   # HF pads 200 -> 208 here: same pairs


def test_bigbird_full_pattern_equals_original_full():
    model = _bigbird("original_full")
    inputs = _bb_inputs()
    ref = model(**inputs).last_hidden_state
    sparsify(model, SlidingWindow(1 << 20))
    _close(model(**inputs).last_hidden_state, ref)                   # every row: no block padding in this mode


def test_bigbird_short_input_mode_switch_and_restore():
    model = _bigbird()
    twin = copy.deepcopy(model)
    short = _bb_inputs(seq=100)                                      # <= 144: HF switches to original_full for good
    ref = twin(**short).last_hidden_state
    assert twin.attention_type == "original_full"
    query = model.encoder.layer[0].attention.self.query
    sparsify(model, "model")
    clone = copy.deepcopy(model)                                     # a copy's mode switch stays in the copy
    clone(**short)
    assert model.encoder.layer[0].attention.self.hf_attention_type == "block_sparse"
    assert clone.encoder.layer[0].attention.self.hf_attention_type == "original_full"
    assert type(restore(clone).encoder.layer[0].attention.self).__name__ == "BigBirdSelfAttention"
    _close(model(**short).last_hidden_state, ref)                    # "model" is full attention at this length
    attn = model.encoder.layer[0].attention
    assert isinstance(attn.self, SparseBigBirdSelfAttention) and attn.self.hf_attention_type == "original_full"
    long = _bb_inputs()
    out = model(**long).last_hidden_state                            # sparse in our module, whatever HF's mode
    restore(model)
    assert type(attn.self).__name__ == "BigBirdSelfAttention" and attn.self.query is query
    assert "set_attention_type" not in attn.__dict__
    assert torch.equal(model(**long).last_hidden_state, twin(**long).last_hidden_state)
    assert out.shape == (2, 200, 32)


def test_bigbird_gradients_match_hf_training():
    model = _bigbird()
    ref_model = copy.deepcopy(model)
    inputs = _bb_inputs()
    proj = torch.randn(32, generator=torch.Generator().manual_seed(5))
    rows = _rows(inputs)
    sparsify(model, "model")
    for m in (model, ref_model):
        m.train()
        (m(**inputs).last_hidden_state[rows] * proj).square().sum().backward()
    checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        if q.grad is None or float(q.grad.abs().max()) == 0 or name.endswith("key.bias"):   # key bias: ~0
            continue
        assert p.grad is not None, name
        assert float((p.grad - q.grad).abs().max()) / float(q.grad.abs().max()) < 1e-4, name
        checked += ".attention.self." in name
    assert checked >= 4


def test_bigbird_restore_bit_identical():
    model = _bigbird()
    inputs = _bb_inputs()
    keys = list(model.state_dict())
    before = model(**inputs).last_hidden_state
    sparsify(model, BigBird(16, random_blocks=1))
    assert list(model.state_dict()) == keys
    sparsify(model, "model", filter_fn=lambda m, fqn: "layer.1." in fqn)
    kinds = [type(layer.attention.self).__name__ for layer in model.encoder.layer]
    assert kinds == ["BigBirdBlockSparseAttention", "SparseBigBirdSelfAttention"]
    restore(model)
    assert torch.equal(model(**inputs).last_hidden_state, before)


def test_bigbird_errors():
    model = _bigbird()
    inputs = _bb_inputs()
    sparsify(model, "model")
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(**inputs, output_attentions=True)
    with pytest.raises(TypeError, match="Pattern"):
        sparsify(model, 3)
    with pytest.raises(ValueError, match="unknown pattern"):
        sparsify(model, "random")
    assert is_sparsified(model)                                      # a refused pattern changes nothing
    with pytest.raises(ValueError, match="multiple of 16"):
        sparsify(_bigbird(block_size=8), "model")
    with pytest.raises(ValueError, match="decoder"):
        sparsify(_bigbird("original_full", is_decoder=True), SlidingWindow(8))
    full = _bigbird("original_full", attention_probs_dropout_prob=0.1)
    sparsify(full, SlidingWindow(16)).train()
    with pytest.raises(NotImplementedError, match="attention dropout"):
        full(**inputs)
    sparsify(full, SlidingWindow(16), ignore_attention_dropout=True)
    full(**inputs).last_hidden_state.sum().backward()
    block = _bigbird(attention_probs_dropout_prob=0.1)               # HF block_sparse has no attention dropout
    sparsify(block, "model").train()
    block(**inputs)
