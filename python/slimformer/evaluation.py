"""Measuring what quantization costs and gains: perplexity, decode speed and memory.

Pure PyTorch/transformers; works on any causal LM whose forward takes ``input_ids`` and returns
``.logits`` (so on a model whose linears slimformer replaced, too).

The protocol (all of it deterministic)::

    >>> from slimformer.evaluation import tokenize_text, calibration_windows, perplexity, find_text_file
    >>> from slimformer.models import load_model
    >>> model, tok = load_model("smollm2")                                             # doctest: +SKIP
    >>> test = tokenize_text(tok, find_text_file("prideprejudice"))                    # doctest: +SKIP
    >>> perplexity(model, test, seqlen=512, max_tokens=16384)                          # doctest: +SKIP
    >>> calib = calibration_windows([tokenize_text(tok, find_text_file(n))
    ...                              for n in ("sensesensibility", "mansfieldpark")], n=32, seqlen=512)  # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

# -- data ---------------------------------------------------------------------------------------
_REPO_ROOT = Path(__file__).resolve().parents[2]  # python/slimformer/evaluation.py -> repo root


def find_text_dir(text_dir: str | os.PathLike | None = None) -> Path:
    """The folder of evaluation texts (``prideprejudice.txt``, ``emma.txt``, ...).

    Looked for, in order: ``text_dir`` if given; ``$SLIMFORMER_DATA`` (the folder itself, or a data
    folder holding ``text/``); ``../shared/data/text`` beside the repository root; the same relative
    to the current directory. Raises FileNotFoundError naming every place tried.
    """
    if text_dir is not None:
        candidates = [Path(text_dir)]
    else:
        candidates = []
        env = os.environ.get("SLIMFORMER_DATA")
        if env:
            candidates += [Path(env) / "text", Path(env)]
        candidates += [_REPO_ROOT.parent / "shared" / "data" / "text", Path.cwd().parent / "shared" / "data" / "text"]
    for c in candidates:
        c = c.expanduser()
        if c.is_dir() and any(c.glob("*.txt")):
            return c
    raise FileNotFoundError(
        "no folder of evaluation texts (*.txt) found; tried " + ", ".join(str(c) for c in candidates)
        + ". Pass --text-dir DIR or set SLIMFORMER_DATA to the folder holding prideprejudice.txt etc.")


def find_text_file(name: str, text_dir: str | os.PathLike | None = None) -> Path:
    """``find_text_dir(text_dir) / (name + ".txt")``, with an error that lists the texts there."""
    folder = find_text_dir(text_dir)
    path = folder / (name if name.endswith(".txt") else name + ".txt")
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in folder.glob("*.txt")))
        raise FileNotFoundError(f"{path} does not exist; {folder} has: {have}")
    return path


def _read_text(path_or_text: str | os.PathLike) -> str:
    """The contents of a file (a ``Path``, or a one-line string naming an existing file), else the
    string itself (UTF-8)."""
    text = str(path_or_text)
    if isinstance(path_or_text, os.PathLike) or ("\n" not in text and len(text) < 4096 and os.path.isfile(text)):
        return Path(path_or_text).read_text(encoding="utf-8")
    return text


def tokenize_text(tokenizer, path_or_text: str | os.PathLike) -> torch.Tensor:
    """Tokenize a whole text into one stream of token ids, LongTensor ``[T]``.

    ``path_or_text`` is read as a file (UTF-8) when it is a ``Path``, or a one-line string naming an
    existing file; any other string is the text itself. No special tokens are added
    (``add_special_tokens=False``): the evaluation windows cut from the stream carry no BOS.

    >>> ids = tokenize_text(tok, "It is a truth universally acknowledged")   # doctest: +SKIP
    """
    text = _read_text(path_or_text)
    # verbose=False: no "sequence longer than model_max_length" warning; we cut windows ourselves.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(token_streams: Sequence[torch.Tensor], n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens for GPTQ calibration, LongTensor ``[n, seqlen]``.

    The exact rule (reproducible across machines, since torch's CPU generator is):
    concatenate the streams in the given order into one stream of T tokens, then
    ``starts = torch.randint(0, T - seqlen + 1, (n,), generator=torch.Generator().manual_seed(seed))``
    and window i is ``stream[starts[i] : starts[i] + seqlen]``. Windows may overlap and may span the
    join of two streams.

    >>> calibration_windows([torch.arange(100), torch.arange(100, 200)], n=4, seqlen=8).shape
    torch.Size([4, 8])
    """
    if n < 1 or seqlen < 1:
        raise ValueError(f"n and seqlen must be positive, got n={n}, seqlen={seqlen}")
    stream = torch.cat([torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in token_streams])
    if stream.numel() < seqlen:
        raise ValueError(f"the calibration text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (n,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


# -- perplexity ---------------------------------------------------------------------------------
def _device_of(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def perplexity(model: torch.nn.Module, tokens: torch.Tensor, seqlen: int = 512, max_tokens: int | None = None,
               batch_size: int = 1, progress: bool = True) -> float:
    """Perplexity on non-overlapping windows, as in the GPTQ paper.

    Rule: keep the first ``max_tokens`` tokens (all if None), cut them into ``floor(T / seqlen)``
    windows of ``seqlen`` tokens (the remainder is dropped), run each window on its own (no BOS, no
    context carried over), and score the prediction of tokens 1..seqlen-1 of each window from the
    ones before. ``ppl = exp(mean NLL over all predicted tokens)``, i.e. over
    ``windows * (seqlen - 1)`` tokens. (The GPTQ reference code divides by ``windows * seqlen``
    instead; the difference is below 0.2% at seqlen 512.)

    >>> perplexity(model, tokenize_text(tok, "prideprejudice.txt"), seqlen=512, max_tokens=4096)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (one token to predict from another), got {seqlen}")
    tokens = torch.as_tensor(tokens).reshape(-1)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n_windows = tokens.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"{tokens.numel()} tokens make no window of {seqlen}; use a longer text or a smaller seqlen")
    windows = tokens[: n_windows * seqlen].view(n_windows, seqlen)
    device = _device_of(model)
    was_training = model.training
    model.eval()  # no dropout
    nll_sum = 0.0  # accumulated in Python floats (fp64)
    try:
        with torch.inference_mode(), tqdm(total=n_windows, desc=f"perplexity ({seqlen}-token windows)",
                                          unit="win", disable=not progress) as bar:
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                # logits[:, j] predicts token j+1: score targets 1..seqlen-1.
                nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
                nll_sum += float(nll)
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return math.exp(nll_sum / (n_windows * (seqlen - 1)))


# -- speed and memory ---------------------------------------------------------------------------
class _TokenClock:
    """A generate() streamer that only records when each put() arrives.

    generate() calls put() once with the prompt, then once per new token (the first new token
    comes out of the prefill forward).
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:  # noqa: ARG002
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generation_speed(model: torch.nn.Module, tokenizer, prompt: str, new_tokens: int = 32,
                     add_special_tokens: bool = False) -> dict:
    """Greedy-decode exactly ``new_tokens`` tokens after ``prompt`` and time the decode phase.

    Returns a dict: ``decode_tokens_per_s`` = (new_tokens - 1) / (time from the first new token to
    the last), i.e. one-token forwards with the KV cache, prefill excluded; ``prefill_s`` (prompt
    forward + first token); ``total_s``; ``prompt_tokens``; ``new_tokens``; ``text`` (the new tokens
    decoded, special tokens skipped). The prompt is used verbatim: apply a chat template yourself
    (:func:`chat_prompt`); ``add_special_tokens`` adds the tokenizer's BOS etc.

    >>> generation_speed(model, tok, chat_prompt(tok, "Tell me about cats."))["decode_tokens_per_s"]  # doctest: +SKIP
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to time a decode step, got {new_tokens}")
    enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_tensors="pt")
    input_ids = enc["input_ids"].to(_device_of(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    clock = _TokenClock()
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
    total = time.perf_counter() - start
    generated = out[0, input_ids.shape[1]:]
    t = clock.times  # [prompt, token 1, ..., token new_tokens]
    decode_s = t[-1] - t[1]
    return {
        "decode_tokens_per_s": (len(t) - 2) / decode_s if decode_s > 0 else float("inf"),
        "prefill_s": t[1] - start,
        "total_s": total,
        "prompt_tokens": int(input_ids.shape[1]),
        "new_tokens": int(generated.numel()),
        "text": tokenizer.decode(generated, skip_special_tokens=True),
    }


def chat_prompt(tokenizer, message: str) -> str:
    """``message`` as one user turn in the tokenizer's chat template (ready for the assistant's
    reply), or ``message`` itself when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return message


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once.

    Tied weights (e.g. embedding and lm_head) and views share a storage and count once; packed
    GPTQ buffers count at their packed size.

    >>> model_memory_bytes(torch.nn.Linear(4, 2))   # 8 weights + 2 biases, fp32
    40
    """
    seen: set[tuple] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr(), storage.nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


# -- sentence embeddings (encoders) -------------------------------------------------------------
def text_sentences(path_or_text: str | os.PathLike, min_words: int = 6, max_words: int = 60) -> list[str]:
    """The sentences of a text (a file path or the text itself), in order, whitespace-normalised.

    Split after ``.``, ``!`` or ``?`` (optionally followed by a closing quote) and a space, but not
    after titles such as ``Mr.``; only
    sentences of ``min_words`` to ``max_words`` words are kept (chapter headings and run-ons drop out).
    """
    text = re.sub(r"\s+", " ", _read_text(path_or_text).replace("_", ""))
    pieces: list[str] = []
    for s in re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’]))\s+(?=[\"'“‘A-Z])", text):
        if pieces and re.search(r"\b(?:Mr|Mrs|Ms|Dr|St|Col|Capt|Gen|Rev)\.$", pieces[-1]):
            pieces[-1] += " " + s  # "Mr. Bennet" does not end a sentence
        else:
            pieces.append(s)
    out = []
    for s in pieces:
        n = len(s.split())
        if min_words <= n <= max_words:
            out.append(s.strip())
    return out


@torch.no_grad()
def sentence_embeddings(model: torch.nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 64,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled (over non-padding tokens), L2-normalised ``last_hidden_state``: float32
    ``[len(sentences), hidden]`` (the sentence-transformers recipe of all-MiniLM-L6-v2)."""
    device = _device_of(model)
    chunks = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        chunks.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(chunks)


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Row-wise cosine of two ``[n, d]`` embedding sets: mean, median, 5th percentile and min."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1)
    return {"mean": float(cos.mean()), "median": float(cos.median()), "p05": float(torch.quantile(cos, 0.05)),
            "min": float(cos.min()), "n": int(cos.numel())}
