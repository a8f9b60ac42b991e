"""Token merging patched into tiny random Hugging Face encoders (slimformer.tome.apply / remove)."""
from __future__ import annotations

import types

import pytest
import torch
from transformers import (BertConfig, BertModel, CamembertConfig, CamembertModel, CLIPConfig, CLIPModel,
                          CLIPVisionConfig, CLIPVisionModel, DeiTConfig, DeiTModel, Dinov2Backbone, Dinov2Config,
                          Dinov2Model, ElectraConfig, ElectraModel, RobertaConfig, RobertaModel, ViTConfig,
                          ViTForImageClassification, ViTModel, XLMRobertaConfig, XLMRobertaModel)

import slimformer.tome as tome
import slimformer.tome.patching as patching
from slimformer.tome import reference

VISION = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
              patch_size=4)  # 64 patches + CLS (+ distillation for DeiT)
TEXT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=80)

VISION_MODELS = {
    "vit": lambda: ViTModel(ViTConfig(**VISION)),
    "deit": lambda: DeiTModel(DeiTConfig(**VISION)),
    "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**VISION)),
    "dinov2": lambda: Dinov2Model(Dinov2Config(**VISION)),
}
TEXT_MODELS = {
    "bert": lambda: BertModel(BertConfig(**TEXT)),
    "roberta": lambda: RobertaModel(RobertaConfig(**TEXT, pad_token_id=1)),
    "xlm-roberta": lambda: XLMRobertaModel(XLMRobertaConfig(**TEXT, pad_token_id=1)),
    "electra": lambda: ElectraModel(ElectraConfig(**TEXT, embedding_size=32)),
    "camembert": lambda: CamembertModel(CamembertConfig(**TEXT, pad_token_id=1)),
}


def _vision(name):
    return VISION_MODELS[name]().eval()


def _pixels(batch=2):
    return torch.randn(batch, 3, 32, 32)


def _text_inputs(batch=3, n=23, lengths=(23, 15, 9)):
    ids = torch.randint(5, TEXT["vocab_size"], (batch, n))
    mask = torch.zeros(batch, n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
    return ids, mask


def _layers(model):
    return model.tome._layers


@pytest.fixture
def reference_ops(monkeypatch):
    """Run the patched models on the fp64 reference instead of the kernels."""
    fake = types.SimpleNamespace(
        tome_match=lambda m, s, roles, r: reference.match_reference(m, s, roles, r),
        tome_merge=lambda x, s, slot, n: reference.merge_reference(x, s, slot, n))
    monkeypatch.setattr(patching, "ops", fake)


# -- r = 0 and remove() ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VISION_MODELS))
@torch.inference_mode()
def test_r0_is_identical_and_remove_restores_vision(name):
    model = _vision(name)
    px = _pixels()
    ref = model(px).last_hidden_state
    classes = [type(m) for m in model.modules()]
    tome.apply(model, r=0)
    assert all(type(layer).__name__.startswith("ToMe") for layer in _layers(model))
    assert torch.equal(model(px).last_hidden_state, ref)
    model.tome.r = [0, 0, 0]
    assert torch.equal(model(px).last_hidden_state, ref)
    tome.remove(model)
    assert [type(m) for m in model.modules()] == classes
    assert not hasattr(model, "tome") and not tome.is_applied(model)
    assert torch.equal(model(px).last_hidden_state, ref)


@pytest.mark.parametrize("name", sorted(TEXT_MODELS))
@torch.inference_mode()
def test_r0_is_identical_and_remove_restores_text(name):
    model = TEXT_MODELS[name]().eval()
    ids, mask = _text_inputs()
    ref = model(ids, attention_mask=mask)
    tome.apply(model, r=0)
    out = model(ids, attention_mask=mask)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    if getattr(ref, "pooler_output", None) is not None:
        assert torch.equal(out.pooler_output, ref.pooler_output)
    tome.remove(model)
    assert type(model.encoder.layer[0]).__name__ == type(model).__name__.replace("Model", "Layer")
    assert not any(type(m).__name__.startswith("ToMe") for m in model.modules())
    assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, ref.last_hidden_state)


# -- merging behaviour ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VISION_MODELS))
@torch.inference_mode()
def test_merging_counts_sizes_and_protected_tokens(name):
    model = _vision(name)
    px = _pixels(3)
    n0 = model(px).last_hidden_state.shape[1]
    tome.apply(model, r=8, unmerge=False)
    out = model(px).last_hidden_state
    st = model.tome
    protect = (0, 1) if name == "deit" else (0,)
    assert st.tokens_per_layer == [n0, n0 - 8, n0 - 16, n0 - 24]
    assert out.shape[1] == n0 - 24
    assert torch.equal(st.sizes.sum(1), torch.full((3,), float(n0)))  # sizes sum to the original count
    # protected tokens stay alone at their positions
    for p in protect:
        assert torch.equal(st.source[:, p], torch.full((3,), p))
        assert torch.equal(st.sizes[:, p], torch.ones(3))
        assert int((st.source == p).sum()) == 3
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["vit", "bert"])
@torch.inference_mode()
def test_kernels_match_the_reference_inside_the_model(name, request):
    if name == "vit":
        model, inputs = _vision("vit"), dict(pixel_values=_pixels())
    else:
        ids, mask = _text_inputs()
        model, inputs = TEXT_MODELS["bert"]().eval(), dict(input_ids=ids, attention_mask=mask)
    tome.apply(model, r=[6, 4, 2] if name == "vit" else 2)
    ours = model(**inputs).last_hidden_state
    ours_source = model.tome.source.clone()
    request.getfixturevalue("reference_ops")
    ref = model(**inputs).last_hidden_state
    assert torch.equal(model.tome.source, ours_source)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@torch.inference_mode()
def test_unmerge_gives_size_weighted_pooling():
    model = _vision("vit")
    px = _pixels()
    tome.apply(model, r=8, unmerge=False)
    merged = model(px).last_hidden_state
    sizes = model.tome.sizes
    model.tome.unmerge = True
    dense = model(px).last_hidden_state
    assert dense.shape == (2, 65, 32)
    weighted = (merged * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True)
    torch.testing.assert_close(dense.mean(1), weighted, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense[:, 0], merged[:, 0])  # CLS untouched by unmerge


@pytest.mark.parametrize("name", sorted(TEXT_MODELS))
@torch.inference_mode()
def test_padded_batch_equals_each_row_alone(name):
    model = TEXT_MODELS[name]().eval()
    lengths = (23, 15, 9)
    ids, mask = _text_inputs(lengths=lengths)
    tome.apply(model, r=2)
    batched = model(ids, attention_mask=mask).last_hidden_state
    assert batched.shape == (3, 23, 32)
    for b, length in enumerate(lengths):
        alone = model(ids[b:b + 1, :length]).last_hidden_state
        torch.testing.assert_close(batched[b:b + 1, :length], alone, rtol=1e-4, atol=1e-5)
        # sizes: only real tokens count
        assert float(model.tome.sizes.sum()) == length


@torch.inference_mode()
def test_padding_keys_are_masked_after_merging():
    """Changing padded token ids changes nothing for the real tokens."""
    model = TEXT_MODELS["bert"]().eval()
    ids, mask = _text_inputs()
    tome.apply(model, r=3)
    a = model(ids, attention_mask=mask).last_hidden_state
    ids2 = ids.clone()
    ids2[mask == 0] = 7
    b = model(ids2, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_knobs_change_between_calls():
    model = _vision("vit")
    px = _pixels()
    tome.apply(model, r=4)
    model(px)
    assert model.tome.tokens_per_layer == [65, 61, 57, 53]
    model.tome.r = (8, -0.5)  # decreasing: 12, 8, 4
    model(px)
    assert model.tome.tokens_per_layer == [65, 53, 45, 41]
    model.tome.r = [10, 0, 5]
    model(px)
    assert model.tome.tokens_per_layer == [65, 55, 55, 50]
    model.tome.protect = (0, 5, 9)
    model(px)
    assert all(int((model.tome.source == model.tome.source[:, p:p + 1]).sum(1).max()) == 1 for p in (0, 5, 9))
    with_prop = model(px).last_hidden_state
    model.tome.prop_attn = False
    assert not torch.allclose(model(px).last_hidden_state, with_prop)


def test_schedules():
    assert tome.parse_r(4, 3) == [3, 3, 3, 3]
    assert tome.parse_r(4, [1, 2]) == [1, 2, 0, 0]
    assert tome.parse_r(3, (8, -0.5)) == [12, 8, 4]
    assert tome.parse_r(3, (8, 0.5)) == [4, 8, 12]
    with pytest.raises(ValueError, match="entries"):
        tome.parse_r(2, [1, 2, 3])
    with pytest.raises(ValueError, match=">= 0"):
        tome.parse_r(2, -1)


@torch.inference_mode()
def test_constant_r_is_clamped_like_tome_but_a_list_is_exact():
    model = _vision("vit")
    px = _pixels()
    tome.apply(model, r=24)  # 65 -> 41 -> 21 -> (21 - 1) // 2 = 10 at the last layer
    model(px)
    assert model.tome.tokens_per_layer == [65, 41, 21, 11]
    model.tome.r = [24, 24, 24]
    with pytest.raises(ValueError, match="larger than possible"):
        model(px)
    model.tome.r = 40
    with pytest.raises(ValueError, match="r = 40 at layer 0 is larger than possible"):
        model(px)


@torch.inference_mode()
def test_zero_tprune_mode_uses_attention_importance():
    model = _vision("vit")
    px = _pixels()
    tome.apply(model, r=8, mode="zero-tprune")
    out = model(px).last_hidden_state
    assert model.config._attn_implementation == "eager"
    assert torch.isfinite(out).all() and torch.equal(model.tome.sizes.sum(1), torch.full((2,), 65.0))
    model.tome.mode = "tome"
    model(px)
    assert model.config._attn_implementation == "sdpa"
    model.tome.mode = "zero-tprune"
    model(px)
    tome.remove(model)
    assert model.config._attn_implementation == "sdpa"


def test_token_importance_is_pagerank_of_the_attention_graph():
    # Everyone attends to token 2: it is the most important; token 3 (padding) gets nothing.
    attn = torch.full((1, 2, 4, 4), 0.1)
    attn[..., 2] = 0.7
    attn[..., 3] = 0.0
    attn = attn / attn.sum(-1, keepdim=True)
    s = tome.token_importance(attn, sizes=torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert int(s.argmax()) == 2 and float(s[0, 3]) == 0.0
    torch.testing.assert_close(s.sum(1), torch.ones(1))
    from slimformer.tome.importance import importance_roles
    # token 3 is padding (a source), and (3 real - 1 protected) // 2 = 1 real source: the less important of 1, 2
    roles = importance_roles(s, torch.tensor([[True, False, False, False]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert roles.tolist() == [[reference.ROLE_KEEP, reference.ROLE_SOURCE, reference.ROLE_DESTINATION,
                               reference.ROLE_SOURCE]]


def test_training_backward_through_merging():
    model = ViTForImageClassification(ViTConfig(**VISION, num_labels=3)).train()
    tome.apply(model, r=8)
    px = _pixels()
    loss = torch.nn.functional.cross_entropy(model(px).logits, torch.tensor([0, 2]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(model.vit.embeddings.patch_embeddings.projection.weight.grad.abs().sum()) > 0


@torch.inference_mode()
def test_classification_head_and_fp16_bf16():
    model = ViTForImageClassification(ViTConfig(**VISION, num_labels=3)).eval()
    px = _pixels()
    tome.apply(model, r=8)
    assert model(px).logits.shape == (2, 3)
    for dtype in (torch.bfloat16, torch.float16):
        m = model.to(dtype)
        out = m(px.to(dtype)).logits
        assert out.dtype == dtype and torch.isfinite(out).all()


# -- bad input --------------------------------------------------------------------------------------
def test_bad_input_errors():
    with pytest.raises(ValueError, match="supports"):
        tome.apply(torch.nn.Sequential(torch.nn.Linear(2, 2)), r=1)
    model = _vision("vit")
    with pytest.raises(ValueError, match="mode"):
        tome.apply(model, r=1, mode="random")
    tome.apply(model, r=1)
    with pytest.raises(ValueError, match="already applied"):
        tome.apply(model, r=1)
    model.tome.protect = (70,)
    with pytest.raises(ValueError, match="outside"):
        model(_pixels())
    tome.remove(model)
    with pytest.raises(ValueError, match="not applied"):
        tome.remove(model)
    decoder = BertModel(BertConfig(**TEXT, is_decoder=True))
    with pytest.raises(ValueError, match="decoder"):
        tome.apply(decoder, r=1)
    flash = _vision("vit")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        tome.apply(flash, r=1)


@torch.inference_mode()
def test_clip_model_merges_only_the_vision_tower():
    model = CLIPModel(CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=64),
                                 vision_config=VISION, projection_dim=16)).eval()
    ids, px = torch.randint(0, 99, (2, 7)), _pixels()
    ref = model(input_ids=ids, pixel_values=px)
    ref_text = model.get_text_features(input_ids=ids)
    ref_text = ref_text if isinstance(ref_text, torch.Tensor) else ref_text.pooler_output
    tome.apply(model, r=0)
    out = model(input_ids=ids, pixel_values=px)
    assert torch.equal(out.logits_per_image, ref.logits_per_image)
    assert all(type(layer).__name__ == "ToMeCLIPEncoderLayer" for layer in model.vision_model.encoder.layers)
    assert all(type(layer).__name__ == "CLIPEncoderLayer" for layer in model.text_model.encoder.layers)
    model.tome.r = 8
    assert torch.isfinite(model(input_ids=ids, pixel_values=px).logits_per_image).all()
    text = model.get_text_features(input_ids=ids)
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    assert torch.equal(text, ref_text)  # the text tower is untouched


@pytest.mark.parametrize("mode", ["tome", "zero-tprune"])
@torch.inference_mode()
def test_left_padding_merges_like_the_row_alone(mode):
    # RoBERTa numbers positions from the first non-pad token, so a left-padded row equals the row alone
    model = TEXT_MODELS["roberta"]().eval()
    ids = torch.randint(5, TEXT["vocab_size"], (2, 23))
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :6] = 0  # left padding: row 1 is 17 tokens long
    ids[1, :6] = model.config.pad_token_id
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state[1:, 6:],
                               model(ids[1:, 6:]).last_hidden_state, rtol=1e-4, atol=1e-5)
    tome.apply(model, r=2, mode=mode)
    batched = model(ids, attention_mask=mask).last_hidden_state
    alone = model(ids[1:, 6:]).last_hidden_state
    torch.testing.assert_close(batched[1:, 6:], alone, rtol=1e-4, atol=1e-5)


@torch.inference_mode()
def test_zero_tprune_padded_row_merges_like_the_row_alone():
    model = TEXT_MODELS["bert"]().eval()
    ids, mask = _text_inputs()
    tome.apply(model, r=2, mode="zero-tprune")
    batched = model(ids, attention_mask=mask).last_hidden_state
    for b, length in enumerate((23, 15, 9)):
        alone = model(ids[b:b + 1, :length]).last_hidden_state
        torch.testing.assert_close(batched[b:b + 1, :length], alone, rtol=1e-4, atol=1e-5)


@torch.inference_mode()
def test_masks_other_than_padding_raise_and_broadcast_masks_work():
    model = TEXT_MODELS["bert"]().eval()
    ids = torch.randint(5, TEXT["vocab_size"], (2, 12))
    tome.apply(model, r=2)
    broadcast = torch.ones(1, 1, 12, 12, dtype=torch.bool)
    ref = model(ids).last_hidden_state
    torch.testing.assert_close(model(ids, attention_mask=broadcast).last_hidden_state, ref)
    custom = broadcast.clone()
    custom[0, 0, 3, 7] = False  # only query 3 may not see key 7: not a padding mask
    with pytest.raises(ValueError, match="padding masks only"):
        model(ids, attention_mask=custom.expand(2, 1, 12, 12))
    model.tome.r = 0  # nothing merges: the mask goes to the original layers untouched
    model(ids, attention_mask=custom.expand(2, 1, 12, 12))


@torch.inference_mode()
def test_r0_after_zero_tprune_is_identical_again():
    model = _vision("vit")
    px = _pixels()
    ref = model(px).last_hidden_state
    tome.apply(model, r=8, mode="zero-tprune")
    model(px)
    model.tome.r = 0
    assert torch.equal(model(px).last_hidden_state, ref)
    assert model.config._attn_implementation == "sdpa"


def test_gradient_checkpointing_raises():
    model = ViTForImageClassification(ViTConfig(**VISION, num_labels=3)).train()
    model.gradient_checkpointing_enable()
    tome.apply(model, r=8)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(_pixels())


def test_backbones_and_zero_tprune_on_submodules_raise():
    backbone = Dinov2Backbone(Dinov2Config(**VISION, out_features=["stage1", "stage3"]))
    with pytest.raises(ValueError, match="backbone"):
        tome.apply(backbone, r=4)
    bert = TEXT_MODELS["bert"]()
    with pytest.raises(ValueError, match="transformers model itself"):
        tome.apply(bert.encoder, r=1, mode="zero-tprune")


@torch.inference_mode()
def test_weights_changed_in_place_are_used():
    model = _vision("vit")
    px = _pixels()
    tome.apply(model, r=8, unmerge=False)
    model(px)
    before = model.tome.source.clone()
    for layer in model.tome._layers:
        layer.attention.k_proj.weight.data.copy_(torch.randn_like(layer.attention.k_proj.weight))
    model(px)
    assert not torch.equal(model.tome.source, before)


@torch.inference_mode()
def test_custom_protection_clamps_int_r_to_the_real_sources():
    model = _vision("vit")
    px = _pixels()
    tome.apply(model, r=24, protect=range(0, 24, 2))  # 12 protected sources: only 21 sources at the first layer
    with pytest.raises(ValueError, match="r = 24 at layer 0 is larger than possible"):
        model(px)
    model.tome.r = 20
    model(px)
    assert model.tome.tokens_per_layer[:2] == [65, 45]
    model.tome.r = [21, 0, 0]
    model(px)
    model.tome.r = [22, 0, 0]
    with pytest.raises(ValueError, match="larger than possible"):
        model(px)


def test_bad_mode_set_after_apply_and_bad_r_types():
    model = _vision("vit")
    tome.apply(model, r=2)
    model.tome.mode = "random"
    with pytest.raises(ValueError, match="mode"):
        model(_pixels())
    with pytest.raises(TypeError):
        tome.parse_r(3, 2.5)
    with pytest.raises(TypeError):
        tome.parse_r(3, [1, 2.5])


def test_training_matches_the_reference_ops(request):
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VISION, num_labels=3, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0)).train()
    tome.apply(model, r=8)
    px, labels = _pixels(), torch.tensor([0, 2])

    def grads():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(px).logits, labels).backward()
        return [p.grad.clone() for p in model.parameters()]

    ours = grads()
    request.getfixturevalue("reference_ops")
    ref = grads()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_patched_model_pickles(tmp_path):
    model = _vision("vit")
    tome.apply(model, r=4)
    torch.save(model, tmp_path / "m.pt")
