"""slimformer.evaluation on a tiny random Llama with a byte-level tokenizer (no downloads):
the perplexity window rule against a direct computation, calibration windows, speed, memory,
and model loading from a local directory."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from slimformer.evaluation import (
    calibration_windows,
    find_text_dir,
    find_text_file,
    generation_speed,
    model_memory_bytes,
    perplexity,
    tokenize_text,
)
from slimformer.models import gptq_config_of, load_model

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 6


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus </s> (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")


def make_tiny_model_dir(path: Path) -> Path:
    """Save a 2-layer random Llama (hidden 64, so it also quantizes with group size 32) and the
    tiny tokenizer to ``path``; returns ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=256, pad_token_id=256, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model_dir, model, tokenizer) of the tiny model, loaded through slimformer.models.load_model."""
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))
    model, tokenizer = load_model(path)
    return path, model, tokenizer


def direct_perplexity(model, windows: list[torch.Tensor]) -> float:
    """exp(mean NLL) of tokens 1.. of each window, one window at a time, from log_softmax."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), dim=-1)
            nll -= float(logp[torch.arange(len(w) - 1), w[1:]].sum())
            count += len(w) - 1
    return math.exp(nll / count)


def test_load_model_from_a_local_directory(tiny):
    path, model, tokenizer = tiny
    assert not model.training and model.dtype == torch.float32
    assert gptq_config_of(path) is None
    assert tokenizer.decode(tokenizer("Mr. Darcy")["input_ids"]) == "Mr. Darcy"


def test_load_model_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'smollm2' nor an existing directory"):
        load_model(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_tokenize_text_reads_files_and_adds_no_special_tokens(tiny, tmp_path):
    _, _, tok = tiny
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    ids = tokenize_text(tok, f)
    assert ids.dtype == torch.long and ids.dim() == 1 and len(ids) == len(TEXT.encode())
    assert torch.equal(ids, tokenize_text(tok, str(f))) and torch.equal(ids, tokenize_text(tok, TEXT))
    assert 256 not in ids.tolist()


def test_perplexity_equals_a_direct_computation(tiny):
    _, model, tok = tiny
    tokens = tokenize_text(tok, TEXT)  # 642 tokens -> 5 windows of 128, 2 tokens dropped
    expected = direct_perplexity(model, list(tokens[: 5 * 128].view(5, 128)))
    for batch_size in (1, 2, 5):
        got = perplexity(model, tokens, seqlen=128, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_window_rule(tiny):
    """First max_tokens tokens, floor(T/seqlen) independent windows, remainder dropped."""
    _, model, tok = tiny
    tokens = tokenize_text(tok, TEXT)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    try:
        ppl = perplexity(model, tokens, seqlen=100, max_tokens=350, batch_size=2, progress=False)
    finally:
        hook.remove()
    windows = torch.cat(seen)
    assert torch.equal(windows, tokens[:300].view(3, 100))  # 350 -> 3 windows, 50 dropped
    assert ppl == pytest.approx(direct_perplexity(model, list(windows)), rel=1e-5)
    assert perplexity(model, tokens[:299], seqlen=100, progress=False) == pytest.approx(
        direct_perplexity(model, list(tokens[:200].view(2, 100))), rel=1e-5)
    with pytest.raises(ValueError, match="make no window"):
        perplexity(model, tokens[:99], seqlen=100, progress=False)


def test_calibration_windows_rule_determinism_and_shapes():
    a, b = torch.arange(0, 300), torch.arange(300, 500)
    w = calibration_windows([a, b], n=16, seqlen=32, seed=3)
    assert w.shape == (16, 32) and w.dtype == torch.long
    assert torch.equal(w, calibration_windows([a, b], n=16, seqlen=32, seed=3))
    assert not torch.equal(w, calibration_windows([a, b], n=16, seqlen=32, seed=4))
    # The documented rule, spelled out: starts from a generator seeded with `seed` over the concatenation.
    starts = torch.randint(0, 500 - 32 + 1, (16,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(w, torch.stack([torch.arange(s, s + 32) for s in starts.tolist()]))
    assert calibration_windows([a], n=2, seqlen=300).tolist() == [list(range(300))] * 2  # exactly one window fits
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows([a], n=1, seqlen=301)


def test_generation_speed_decodes_exactly_new_tokens(tiny):
    _, model, tok = tiny
    r = generation_speed(model, tok, "Elizabeth", new_tokens=6)
    assert r["new_tokens"] == 6 and r["prompt_tokens"] == len("Elizabeth")
    assert r["decode_tokens_per_s"] > 0 and 0 < r["prefill_s"] <= r["total_s"]
    assert isinstance(r["text"], str)
    assert generation_speed(model, tok, "Elizabeth", new_tokens=6)["text"] == r["text"]  # greedy


def test_model_memory_counts_each_storage_once():
    lin = torch.nn.Linear(8, 4)
    assert model_memory_bytes(lin) == (8 * 4 + 4) * 4
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert model_memory_bytes(tied) == 10 * 8 * 4
    lin.register_buffer("packed", torch.zeros(3, dtype=torch.int32))
    assert model_memory_bytes(lin) == (8 * 4 + 4) * 4 + 12


def test_find_text_file(tmp_path, monkeypatch):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "emma.txt").write_text("Emma Woodhouse")
    monkeypatch.setenv("SLIMFORMER_DATA", str(tmp_path))
    assert find_text_dir() == tmp_path / "text"
    assert find_text_file("emma") == tmp_path / "text" / "emma.txt"
    with pytest.raises(FileNotFoundError, match="has: emma"):
        find_text_file("persuasion")
    with pytest.raises(FileNotFoundError, match="--text-dir"):
        find_text_dir(tmp_path / "nowhere")


# -- sentence embeddings (encoders) -----------------------------------------------------------------
def test_text_sentences_splits_and_filters():
    from slimformer.evaluation import text_sentences

    text = ('CHAPTER I\n\nIt is a truth universally acknowledged, that a single man must want a wife. '
            '"Do you not want to know who has taken it?" cried his wife impatiently.\nShort one. '
            'Mr. Bennet replied that he had not, and the evening passed in _great_ quiet.')
    got = text_sentences(text, min_words=5)
    assert got == ["CHAPTER I It is a truth universally acknowledged, that a single man must want a wife.",
                   '"Do you not want to know who has taken it?" cried his wife impatiently.',
                   "Mr. Bennet replied that he had not, and the evening passed in great quiet."]
    assert text_sentences(text, min_words=2, max_words=2) == ["Short one."]


def test_sentence_embeddings_mean_pool_ignores_padding():
    from transformers import BertConfig, BertModel

    from slimformer.evaluation import embedding_cosine, sentence_embeddings

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=264, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=128), add_pooling_layer=False).eval()
    tok = tiny_tokenizer()
    sentences = ["a b", "a much longer sentence than the first"]
    together = sentence_embeddings(model, tok, sentences)
    alone = torch.cat([sentence_embeddings(model, tok, [s]) for s in sentences])
    assert together.shape == (2, 32)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)  # padding changes nothing
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(2))
    cos = embedding_cosine(together, together)
    assert cos["n"] == 2 and abs(cos["mean"] - 1) < 1e-9 and cos["min"] <= cos["median"] <= 1 + 1e-9
