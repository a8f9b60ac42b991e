"""slimformer.binary.distill (binary/distillation.py): losses, Teacher Intervention, resume, padding, argument errors.

Tiny random HF models (no downloads); students are perturbed copies of the teacher, or real
binarized students (slimformer.binary.binarize).
"""
from __future__ import annotations

import copy
import importlib
import json
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from slimformer.binary.distillation import _attention_loss, distill, intervention_lambda, latest_checkpoint  # noqa: E402

VOCAB, SEQ = 64, 8


def bert(layers: int = 2, dropout: float = 0.0, attn: str = "eager") -> BertModel:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    model = BertModel(cfg)
    model.set_attn_implementation(attn)
    return model


def llama(layers: int = 2) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("eager")
    return model


def gpt2(layers: int = 2) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=2, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.set_attn_implementation("eager")
    return model


def perturbed(model: nn.Module, scale: float = 0.05, only: str | None = None) -> nn.Module:
    student = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.dim() >= 2 and (only is None or only in name):
                p.add_(scale * torch.randn_like(p))
    return student


def make_batches(n: int = 4, batch: int = 4, pad: bool = True, gen_seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(gen_seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, SEQ), generator=g)
        mask = torch.ones(batch, SEQ, dtype=torch.long)
        if pad:
            for r in range(batch):
                length = int(torch.randint(3, SEQ + 1, (1,), generator=g))
                mask[r, length:] = 0
                ids[r, length:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def pre_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


# -- losses go down -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_loss_decreases(arch):
    teacher = bert() if arch == "bert" else llama()
    student = perturbed(teacher, 0.1)
    hist = distill(student, teacher, make_batches(4), steps=40, lr=3e-3, warmup_steps=2, progress=False)
    assert len(hist) == 40 and [h["step"] for h in hist] == list(range(1, 41))
    assert set(hist[0]["losses"]) == {"total", "logits", "hidden", "attention"}
    first = sum(h["losses"]["total"] for h in hist[:4])
    last = sum(h["losses"]["total"] for h in hist[-4:])
    assert last < 0.5 * first, (first, last)
    for h in hist:
        assert h["lr"] >= 0 and h["seconds"] >= 0 and math.isfinite(h["grad_norm"])
    # warmup then linear decay
    assert hist[0]["lr"] < hist[1]["lr"] < hist[2]["lr"] and hist[-1]["lr"] < hist[10]["lr"]


def test_logits_kl_is_zero_for_identical_models_and_weights_apply():
    teacher = llama()
    student = copy.deepcopy(teacher)
    hist = distill(student, teacher, make_batches(1), steps=1, lr=0.0, progress=False, temperature=2.0,
                   attention_loss="kl")
    for k in ("logits", "hidden", "attention"):
        assert abs(hist[0]["losses"][k]) < 1e-6
    student = perturbed(teacher, 0.1)
    h1 = distill(student, teacher, make_batches(1), steps=1, lr=0.0, progress=False)[0]["losses"]
    h2 = distill(student, teacher, make_batches(1), steps=1, lr=0.0, progress=False,
                 logits_weight=2.0, hidden_weight=0.0, attention_weight=0.5)[0]["losses"]
    assert set(h2) == {"total", "logits", "attention"}
    assert h2["total"] == pytest.approx(2 * h1["logits"] + 0.5 * h1["attention"], rel=1e-5)
    assert h1["total"] == pytest.approx(h1["logits"] + h1["hidden"] + h1["attention"], rel=1e-5)


# -- Teacher Intervention -------------------------------------------------------------------------
def test_intervention_schedule():
    # N = 6, hold 0.5: lambda = 1 for steps 0-2, then 1 -> 0 linearly, reaching 0 at step 6
    lams = [intervention_lambda(s, 6, 0.5) for s in range(8)]
    assert lams == pytest.approx([1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0])
    assert [intervention_lambda(s, 4, 0.0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [intervention_lambda(s, 3, 1.0) for s in range(4)] == [1.0, 1.0, 1.0, 0.0]
    assert intervention_lambda(0, 0) == 0.0


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_intervention_hooks_active_then_removed(arch):
    teacher = {"bert": bert, "llama": llama, "gpt2": gpt2}[arch]()
    student = perturbed(teacher, 0.05)
    base = pre_hooks(student)
    seen = []

    def callback(rec):
        seen.append((rec["ti_lambda"], pre_hooks(student) - base))

    hist = distill(student, teacher, make_batches(2), steps=6, lr=1e-3, intervention_steps=4,
                   intervention_hold=0.5, progress=False, callback=callback)
    assert [h["ti_lambda"] for h in hist] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    n_blocks = teacher.config.num_hidden_layers
    assert [n for _, n in seen] == [n_blocks] * 4 + [0, 0]
    # after distill: no hooks, and the student computes exactly what a plain copy computes
    assert pre_hooks(student) == base
    plain = copy.deepcopy(student)
    plain.load_state_dict(student.state_dict())
    student.eval(), plain.eval()
    x = make_batches(1, gen_seed=5)[0]
    with torch.no_grad():
        a = student(**x, output_hidden_states=True).hidden_states[-1]
        b = plain(**x, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(a, b)


def test_intervention_feeds_teacher_inputs():
    """With lambda = 1 and only block 0 perturbed, block 1 sees the teacher's input, so the only
    hidden-state error left is block 0's output."""
    teacher = bert(layers=3)
    student = perturbed(teacher, 0.2, only="encoder.layer.0.")
    batch = make_batches(1)
    common = dict(steps=1, lr=0.0, progress=False, logits_weight=0.0, attention_weight=0.0)
    with_ti = distill(student, teacher, batch, intervention_steps=5, intervention_hold=1.0, **common)
    without = distill(student, teacher, batch, **common)
    mask = batch[0]["attention_mask"].float()
    with torch.no_grad():
        hs = student(**batch[0], output_hidden_states=True).hidden_states
        ht = teacher(**batch[0], output_hidden_states=True).hidden_states
    err = [float(((s - t).pow(2).mean(-1) * mask).sum() / mask.sum()) for s, t in zip(hs, ht)]
    assert err[2] > 1e-6 and err[3] > 1e-6       # without TI the error carries on
    assert with_ti[0]["ti_lambda"] == 1.0
    assert with_ti[0]["losses"]["hidden"] == pytest.approx(err[1] / 4, rel=1e-4)
    assert without[0]["losses"]["hidden"] == pytest.approx(sum(err) / 4, rel=1e-4)


# -- resume ---------------------------------------------------------------------------------------
def test_resume_matches_uninterrupted_run(tmp_path):
    teacher = bert(dropout=0.1)
    init = perturbed(teacher, 0.1)
    batches = make_batches(4)
    kw = dict(steps=6, lr=2e-3, warmup_steps=2, schedule="cosine", intervention_steps=4, dropout=True,
              checkpoint_every=3, progress=False)

    torch.manual_seed(123)
    straight = copy.deepcopy(init)
    h_straight = distill(straight, teacher, batches, checkpoint_dir=tmp_path / "a", **kw)

    torch.manual_seed(123)
    first = copy.deepcopy(init)
    h_first = distill(first, teacher, batches, checkpoint_dir=tmp_path / "b", callback=lambda r: r["step"] == 3, **kw)
    assert len(h_first) == 3
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "step-00000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.safetensors", "state.json", "student.safetensors"]
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3

    torch.manual_seed(999)                         # a different RNG: the checkpoint restores it
    resumed = copy.deepcopy(init)                  # fresh weights: the checkpoint restores them
    h_resumed = distill(resumed, teacher, batches, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert [h["step"] for h in h_resumed] == list(range(1, 7))
    for a, b in zip(h_straight, h_resumed):
        assert a["losses"]["total"] == pytest.approx(b["losses"]["total"], rel=1e-6, abs=1e-9)
        assert a["lr"] == pytest.approx(b["lr"]) and a["ti_lambda"] == b["ti_lambda"]
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    assert pre_hooks(resumed) == pre_hooks(init)
    # a completed run resumes to a no-op; a checkpoint made with other settings is refused
    assert len(distill(resumed, teacher, batches, checkpoint_dir=tmp_path / "b", resume=True, **kw)) == 6
    with pytest.raises(ValueError, match="steps"):
        distill(resumed, teacher, batches, checkpoint_dir=tmp_path / "b", resume=True, **{**kw, "steps": 8})


def test_checkpoint_pruning_and_resume_without_checkpoint(tmp_path):
    teacher = llama()
    student = perturbed(teacher)
    distill(student, teacher, make_batches(2), steps=5, checkpoint_dir=tmp_path, checkpoint_every=1,
            keep_checkpoints=2, resume=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


# -- padding --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_attention_loss_ignores_padding(kind):
    b, h, s = 2, 3, 5
    t = torch.softmax(torch.randn(b, h, s, s), -1)
    st = torch.softmax(torch.randn(b, h, s, s), -1)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, 3:] = 0
    full = _attention_loss(st, t, mask, kind, 0)
    # change every entry whose query or key is a padded token, in both maps: the loss must not move
    noisy_s, noisy_t = st.clone(), t.clone()
    for m in (noisy_s, noisy_t):
        m[0, :, 3:, :] = torch.rand(h, 2, s)
        m[0, :, :, 3:] = torch.rand(h, s, 2)
    torch.testing.assert_close(_attention_loss(noisy_s, noisy_t, mask, kind, 0), full)
    assert not torch.allclose(_attention_loss(noisy_s, noisy_t, None, kind, 0), full)
    assert float(_attention_loss(t, t, mask, kind, 0)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("attention_loss", ["mse", "kl"])
def test_distill_losses_ignore_padded_tokens(attention_loss):
    """Two batches that differ only in the ids at padded positions give the same losses."""
    teacher = bert()
    student = perturbed(teacher, 0.1)
    a = make_batches(1)
    b = copy.deepcopy(a)
    pad = a[0]["attention_mask"] == 0
    assert pad.any()
    b[0]["input_ids"][pad] = torch.randint(1, VOCAB, (int(pad.sum()),))
    la = distill(student, teacher, a, steps=1, lr=0.0, attention_loss=attention_loss, progress=False)[0]["losses"]
    lb = distill(student, teacher, b, steps=1, lr=0.0, attention_loss=attention_loss, progress=False)[0]["losses"]
    for k in ("logits", "hidden", "attention"):
        assert la[k] > 0
        assert la[k] == pytest.approx(lb[k], rel=1e-5, abs=1e-9), k
    # without the mask the padded ids do count
    nomask = [{"input_ids": a[0]["input_ids"]}], [{"input_ids": b[0]["input_ids"]}]
    lc = distill(student, teacher, nomask[0], steps=1, lr=0.0, progress=False)[0]["losses"]
    ld = distill(student, teacher, nomask[1], steps=1, lr=0.0, progress=False)[0]["losses"]
    assert lc["hidden"] != pytest.approx(ld["hidden"], rel=1e-5)


# -- model state is restored ------------------------------------------------------------------------
def test_attention_implementation_dropout_and_modes_restored():
    teacher = bert(dropout=0.1, attn="sdpa")
    student = perturbed(teacher)
    student.eval()
    teacher.train()
    distill(student, teacher, make_batches(1), steps=2, progress=False)
    assert teacher.config._attn_implementation == "sdpa" and student.config._attn_implementation == "sdpa"
    assert not student.training and teacher.training
    assert all(m.p == 0.1 for m in student.modules() if isinstance(m, nn.Dropout))


def test_layer_map_for_shallower_student():
    teacher = bert(layers=4)
    student = bert(layers=2)
    student.load_state_dict(teacher.state_dict(), strict=False)
    with pytest.raises(ValueError, match="layer_map"):
        distill(student, teacher, make_batches(1), steps=1, progress=False)
    with pytest.raises(ValueError, match="layer_map"):
        distill(student, teacher, make_batches(1), steps=1, progress=False, layer_map=[1, 2, 3])
    with pytest.raises(ValueError, match="layer_map"):
        distill(student, teacher, make_batches(1), steps=1, progress=False, layer_map=[1, 4])
    hist = distill(student, teacher, make_batches(2), steps=3, progress=False, layer_map=[1, 3], intervention_steps=2)
    assert len(hist) == 3 and all(math.isfinite(h["losses"]["total"]) for h in hist)
    # only the logits term needs no map
    assert len(distill(student, teacher, make_batches(1), steps=1, progress=False, hidden_weight=0.0,
                       attention_weight=0.0)) == 1


# -- bad input ------------------------------------------------------------------------------------
def test_bad_input_errors():
    teacher = bert()
    student = perturbed(teacher)
    batches = make_batches(1)
    kw = dict(steps=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        distill(student, teacher, [], progress=False)
    with pytest.raises(ValueError, match="empty"):
        distill(student, teacher, iter([]), **kw)
    with pytest.raises(ValueError, match="no length"):
        distill(student, teacher, iter(batches), progress=False)
    for bad in (-1.0, float("nan"), float("inf"), "1", None):
        with pytest.raises(ValueError, match="hidden_weight"):
            distill(student, teacher, batches, hidden_weight=bad, **kw)
    with pytest.raises(ValueError, match="all loss weights"):
        distill(student, teacher, batches, logits_weight=0, hidden_weight=0, attention_weight=0, **kw)
    with pytest.raises(ValueError, match="attention_loss"):
        distill(student, teacher, batches, attention_loss="l1", **kw)
    with pytest.raises(ValueError, match="temperature"):
        distill(student, teacher, batches, temperature=0, **kw)
    with pytest.raises(ValueError, match="schedule"):
        distill(student, teacher, batches, schedule="step", **kw)
    with pytest.raises(ValueError, match="steps"):
        distill(student, teacher, batches, steps=0, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        distill(student, teacher, batches, resume=True, **kw)
    with pytest.raises(ValueError, match="same module"):
        distill(teacher, teacher, batches, **kw)
    with pytest.raises(TypeError, match="dict of tensors"):
        distill(student, teacher, [batches[0]["input_ids"]], **kw)
    with pytest.raises(TypeError, match="iterable of dicts"):
        distill(student, teacher, batches[0], **kw)
    with pytest.raises(ValueError, match="task_weight"):
        distill(student, teacher, batches, task_weight=1.0, **kw)
    with pytest.raises(ValueError, match="layers"):
        distill(student, bert(layers=3), batches, **kw)


def test_one_shot_iterator_and_epochs():
    teacher = llama()
    student = perturbed(teacher)
    # a generator is used once; steps beyond it stop with a warning
    hist = distill(student, teacher, (b for b in make_batches(3)), steps=5, progress=False)
    assert len(hist) == 3
    assert len(distill(student, teacher, make_batches(3), epochs=2, progress=False)) == 6


def test_task_loss_with_labels():
    teacher = llama()
    student = perturbed(teacher)
    batches = [dict(b, labels=b["input_ids"]) for b in make_batches(2)]
    hist = distill(student, teacher, batches, steps=2, task_weight=0.5, progress=False)
    assert hist[0]["losses"]["task"] > 0
    assert "task" not in distill(student, teacher, batches, steps=1, progress=False)[0]["losses"]


# -- real binarized students ------------------------------------------------------------------------
def _binarize_or_skip():
    from slimformer.binary import binarize

    return binarize


def test_package_exports_are_the_functions():
    """``slimformer.binary.distill`` / ``binarize`` stay the functions even after their modules
    (distillation.py, patching.py; named apart for this reason) have been imported."""
    import slimformer.binary as binary

    importlib.import_module("slimformer.binary.distillation")
    importlib.import_module("slimformer.binary.patching")
    assert binary.distill is distill and callable(binary.binarize) and callable(binary.freeze)
    teacher = llama()
    assert len(binary.distill(perturbed(teacher), teacher, make_batches(1), steps=1, progress=False)) == 1


def _binarized(teacher: nn.Module, activations: str) -> nn.Module:
    binarize = _binarize_or_skip()
    from slimformer.binary import BinarizeConfig

    student = copy.deepcopy(teacher)
    binarize(student, BinarizeConfig(activations=activations))
    return student


def _scales(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith((".scale", ".shift"))}


@pytest.mark.parametrize("arch,activations", [("bert", "binary"), ("llama", "binary"), ("gpt2", "fp")])
def test_binarized_student(arch, activations):
    teacher = {"bert": bert, "llama": llama, "gpt2": gpt2}[arch]()
    student = _binarized(teacher, activations)
    impl = student.config._attn_implementation
    hooks = pre_hooks(student)
    hist = distill(student, teacher, make_batches(4), steps=24, lr=3e-3, warmup_steps=2, progress=False)
    first = sum(h["losses"]["total"] for h in hist[:4])
    last = sum(h["losses"]["total"] for h in hist[-4:])
    assert last < first, (first, last)
    assert all(h["losses"]["attention"] > 0 for h in hist)
    assert student.config._attn_implementation == impl and pre_hooks(student) == hooks


def test_binarized_student_trains_scales_and_takes_intervention():
    teacher = llama()
    student = _binarized(teacher, "binary")
    seen = []
    distill(student, teacher, make_batches(1), steps=1, lr=0.0, progress=False)   # quantizers initialise
    before = _scales(student)
    assert before, "binarize created no quantizer scales"
    hist = distill(student, teacher, make_batches(2), steps=4, lr=1e-2, intervention_steps=2, progress=False,
                   callback=lambda r: seen.append(pre_hooks(student)))
    assert [h["ti_lambda"] for h in hist] == [1.0, 1.0, 0.0, 0.0]
    assert seen[0] - seen[-1] == teacher.config.num_hidden_layers    # one TI hook per block, then none
    after = _scales(student)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_binarized_resume(tmp_path):
    teacher = llama()
    init = _binarized(teacher, "binary")           # quantizers not initialised yet: the first batch does it
    batches = make_batches(2)
    kw = dict(steps=4, lr=3e-3, warmup_steps=1, intervention_steps=2, checkpoint_every=2, progress=False)
    straight = copy.deepcopy(init)
    h1 = distill(straight, teacher, batches, checkpoint_dir=tmp_path / "a", **kw)
    part = copy.deepcopy(init)
    distill(part, teacher, batches, checkpoint_dir=tmp_path / "b", callback=lambda r: r["step"] == 2, **kw)
    resumed = copy.deepcopy(init)
    h2 = distill(resumed, teacher, batches, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert [h["losses"]["total"] for h in h1] == pytest.approx([h["losses"]["total"] for h in h2], rel=1e-6)
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], rtol=1e-6, atol=1e-7, msg=n)


def test_hooks_and_modes_restored_when_a_step_fails():
    teacher = bert()
    student = perturbed(teacher)
    hooks = pre_hooks(student)
    student.eval()

    def boom(rec):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        distill(student, teacher, make_batches(2), steps=4, intervention_steps=4, progress=False, callback=boom)
    assert pre_hooks(student) == hooks and not student.training
