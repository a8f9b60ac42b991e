#!/usr/bin/env python
"""Interoperability of slimformer's GPTQ checkpoints with GPTQModel (tested with 7.7.0), both ways.

  A: GPTQModel quantizes and saves a tiny random Llama  -> slimformer.gptq.load reads it
  B: slimformer.gptq.quantize + save                    -> GPTQModel.load reads it

Every checkpoint is also turned into an independent fp64 reference: its packed tensors are
dequantized with slimformer.gptq.reference.dequantize_reference (pure PyTorch) into a plain
transformers model. Each loader's logits are compared with that reference and with each other.

Two interpreters: this script runs under the slimformer environment and calls itself under the
GPTQModel environment (``--gptqmodel-python``) for the GPTQModel side, exchanging checkpoint
directories and logits files through ``--workdir``. No downloads: the model and its tokenizer are
built from a config with random weights.

    python benchmarks/interop_gptqmodel.py --gptqmodel-python /tmp/venv-gptqmodel/bin/python
    python benchmarks/interop_gptqmodel.py --gptqmodel-python ... --quick        # 2 variants each way

GPTQModel environment (CPU, torch 2.13 here although GPTQModel 7.7.0 declares torch>=2.14.1):
    python3 -m venv /tmp/venv-gptqmodel && . /tmp/venv-gptqmodel/bin/activate
    pip install torch==2.13.0 numpy transformers safetensors tqdm
    pip install --no-deps --no-build-isolation gptqmodel==7.7.0
    pip install threadpoolctl device-smi pypcre tokenicer logbar defuser protobuf pillow requests accelerate

GPTQModel's kernels run in fp16/bf16 only (fp32 is refused), so its logits differ from the fp64
reference by fp16/bf16 rounding; slimformer runs in fp32 on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 320
SEED = 0
# name: (base model, bits, group_size, desc_act, sym, checkpoint_format)
VARIANTS = {
    "4b g32": ("base", 4, 32, False, True, "gptq"),
    "4b g32 act": ("base", 4, 32, True, True, "gptq"),
    "4b g32 v2": ("base", 4, 32, False, True, "gptq_v2"),
    "4b g32 asym": ("base", 4, 32, False, False, "gptq"),
    "4b g32 asym v2": ("base", 4, 32, False, False, "gptq_v2"),
    "3b g32": ("base", 3, 32, False, True, "gptq"),
    "3b g32 act": ("base", 3, 32, True, True, "gptq"),
    "2b g32": ("base", 2, 32, False, True, "gptq"),
    "8b g32": ("base", 8, 32, False, True, "gptq"),
    "4b g-1 act": ("base", 4, -1, True, True, "gptq"),
    "4b g64 K%g!=0": ("odd", 4, 64, False, True, "gptq"),  # hidden 96, intermediate 160
}
QUICK = ["4b g32", "3b g32 act"]
# GPTQModel loads: (backend, dtype). gptq_torch is its plain PyTorch kernel; auto picks the fast CPU kernel.
GQM_LOADS = [("gptq_torch", "float16"), ("auto", "bfloat16")]
# max |logits - fp64 reference| / max |reference| allowed per compute dtype
TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
# GPTQModel 7.7.0 behaviour that is not a slimformer problem: error text -> explanation
KNOWN_GQM_LIMITS = {
    "expect K to be divisible by qGroupSize":
        "GPTQModel's auto backend picks its torch int4 kernel (TorchAtenLinear), which needs "
        "in_features % group_size == 0; its gptq_torch backend reads the same checkpoint fine",
    "sym=False model with format=FORMAT.GPTQ is only supported if produced by gptqmodel":
        "GPTQModel refuses every asymmetric v1 (format gptq) checkpoint whose quantize_config meta.quantizer "
        "does not name gptqmodel >= 0.9.0; use checkpoint_format='gptq_v2' for sym=False",
}


def eval_ids() -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))


def calib_ids() -> torch.Tensor:
    return torch.randint(2, VOCAB, (8, 64), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# tiny model + tokenizer (either interpreter; only transformers/tokenizers)
# ---------------------------------------------------------------------------------------------
def make_base(path: Path, hidden: int, intermediate: int) -> None:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ["the quick brown fox jumps over the lazy dog", "a tiny model for testing gptq checkpoints",
            "hello world this is a test of interop between two libraries"] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                               pad_token="</s>")
    assert len(tok) == VOCAB, len(tok)
    torch.manual_seed(SEED)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)


# ---------------------------------------------------------------------------------------------
# GPTQModel side (run under --gptqmodel-python)
# ---------------------------------------------------------------------------------------------
def gqm_quantize(jobs: list[dict]) -> dict:
    from gptqmodel import GPTQModel, QuantizeConfig

    status = {}
    calib = [{"input_ids": row[None], "attention_mask": torch.ones(1, row.numel(), dtype=torch.long)}
             for row in calib_ids()]
    for job in jobs:
        t0 = time.perf_counter()
        try:
            qc = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], desc_act=job["desc_act"],
                                sym=job["sym"], format=job["format"],
                                **({"act_group_aware": False} if job["desc_act"] else {}))
            model = GPTQModel.load(job["base"], qc, device="cpu")
            model.quantize(calib, batch_size=1)
            model.save(job["out"])
            status[job["out"]] = {"ok": True, "seconds": time.perf_counter() - t0}
        except Exception as e:  # report, keep going with the other variants
            status[job["out"]] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
    return status


def gqm_logits(jobs: list[dict]) -> dict:
    from gptqmodel import BACKEND, GPTQModel

    status = {}
    ids = eval_ids()
    for job in jobs:
        for backend, dtype in GQM_LOADS:
            key = f"{job['ckpt']}|{backend}|{dtype}"
            try:
                model = GPTQModel.load(job["ckpt"], device="cpu", backend=BACKEND(backend), dtype=getattr(torch, dtype))
                kernel = type(model.model.get_submodule("model.layers.0.self_attn.q_proj")).__name__
                with torch.no_grad():
                    logits = model.model(ids).logits.float()
                out = f"{job['ckpt']}.gqm-{backend}-{dtype}.pt"
                torch.save(logits, out)
                status[key] = {"ok": True, "logits": out, "kernel": kernel}
                del model
            except Exception as e:
                status[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
    return status


# ---------------------------------------------------------------------------------------------
# slimformer side (this interpreter)
# ---------------------------------------------------------------------------------------------
def sf_quantize(base: Path, out: Path, bits, group_size, desc_act, sym, fmt) -> torch.Tensor:
    import transformers
    import slimformer.gptq as gptq

    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    gptq.quantize(model, calib_ids(), bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                  checkpoint_format=fmt, progress=False)
    gptq.save(model, out, tokenizer=tok)
    with torch.no_grad():
        return model(eval_ids()).logits


def sf_logits(ckpt: Path) -> torch.Tensor:
    import slimformer.gptq as gptq

    model = gptq.load(ckpt)  # fp32 on CPU
    with torch.no_grad():
        return model(eval_ids()).logits


def reference_logits(ckpt: Path) -> torch.Tensor:
    """fp64 logits of the checkpoint, dequantized with the pure-PyTorch reference (no kernel, no loader)."""
    import transformers
    from safetensors.torch import load_file
    from slimformer.gptq import dequantize_reference, zero_offset

    cfg = transformers.AutoConfig.from_pretrained(ckpt)
    qc = cfg.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    bits, fmt = qc["bits"], qc.get("checkpoint_format") or qc.get("format") or "gptq"
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
    state = {}
    for name, t in tensors.items():
        module, _, attr = name.rpartition(".")
        if attr == "qweight":
            w = dequantize_reference(t, tensors[f"{module}.qzeros"], tensors[f"{module}.scales"],
                                     tensors[f"{module}.g_idx"], bits, zero_offset(fmt))
            state[f"{module}.weight"] = w.t()
        elif f"{module}.qweight" in tensors and attr != "bias":
            continue  # qzeros, scales, g_idx
        else:
            state[name] = t.to(torch.float64)
    del cfg.quantization_config
    model = getattr(transformers, cfg.architectures[0])(cfg).to(torch.float64).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"reference for {ckpt}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        return model(eval_ids()).logits


def fp_logits(base: Path) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(eval_ids()).logits


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def run_gqm(python: str, role: str, jobs: list[dict], work: Path) -> dict:
    jobs_file, status_file = work / f"{role}.jobs.json", work / f"{role}.status.json"
    jobs_file.write_text(json.dumps(jobs, indent=1))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    log = work / f"{role}.log"
    with open(log, "w") as fh:
        # cwd: GPTQModel writes per-layer logs to ./logs/ of the working directory
        proc = subprocess.run([python, os.path.abspath(__file__), "--role", role, "--jobs", str(jobs_file),
                               "--status", str(status_file)], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work)
    if proc.returncode != 0 or not status_file.exists():
        tail = log.read_text()[-3000:]
        raise SystemExit(f"GPTQModel side ({role}) failed with exit code {proc.returncode}; log {log}:\n{tail}")
    return json.loads(status_file.read_text())


def diff(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (a.double() - ref).abs().max().item()
    return d, d / ref.abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gptqmodel-python", default="/tmp/venv-gptqmodel/bin/python")
    ap.add_argument("--workdir", default=None, help="keep checkpoints and logs here (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    ap.add_argument("--variants", default=None, help="comma-separated names from: " + ", ".join(VARIANTS))
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", help=argparse.SUPPRESS)
    ap.add_argument("--status", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role:  # we are the GPTQModel-side child
        jobs = json.loads(Path(args.jobs).read_text())
        status = {"gqm-quantize": gqm_quantize, "gqm-logits": gqm_logits}[args.role](jobs)
        Path(args.status).write_text(json.dumps(status, indent=1))
        return

    names = QUICK if args.quick else (args.variants.split(",") if args.variants else list(VARIANTS))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    tmp = None
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="interop-gptqmodel-")
        work = Path(tmp.name)
    start = time.perf_counter()

    bases = {"base": (128, 256), "odd": (96, 160)}
    for b in {VARIANTS[n][0] for n in names}:
        make_base(work / b, *bases[b])
    fp = {b: fp_logits(work / b) for b in {VARIANTS[n][0] for n in names}}

    def slug(name):
        return name.replace(" ", "_").replace("%", "mod").replace("!=", "ne")

    # A: GPTQModel quantizes
    a_jobs = [dict(base=str(work / VARIANTS[n][0]), out=str(work / f"A-{slug(n)}"), bits=VARIANTS[n][1],
                   group_size=VARIANTS[n][2], desc_act=VARIANTS[n][3], sym=VARIANTS[n][4], format=VARIANTS[n][5])
              for n in names]
    t0 = time.perf_counter()
    a_status = run_gqm(args.gptqmodel_python, "gqm-quantize", a_jobs, work)
    t_gqm_quant = time.perf_counter() - t0

    # B: slimformer quantizes
    b_status, sf_inmem = {}, {}
    t0 = time.perf_counter()
    for n in names:
        base, bits, gs, act, sym, fmt = VARIANTS[n]
        out = work / f"B-{slug(n)}"
        try:
            sf_inmem[n] = sf_quantize(work / base, out, bits, gs, act, sym, fmt)
            b_status[str(out)] = {"ok": True}
        except Exception as e:
            b_status[str(out)] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
    t_sf_quant = time.perf_counter() - t0

    ckpts = [(d, n, str(work / f"{d}-{slug(n)}")) for d in "AB" for n in names]
    made = {**a_status, **b_status}
    t0 = time.perf_counter()
    g_status = run_gqm(args.gptqmodel_python, "gqm-logits", [{"ckpt": c} for _, _, c in ckpts if made[c]["ok"]], work)
    t_gqm_load = time.perf_counter() - t0

    rows = []
    for direction, name, ckpt in ckpts:
        row = {"direction": direction, "variant": name, "ckpt": ckpt, "errors": []}
        rows.append(row)
        if not made[ckpt]["ok"]:
            row["errors"].append(("quantize/save", made[ckpt]["error"]))
            continue
        ref = reference_logits(Path(ckpt))
        row["ref_max"] = ref.abs().max().item()
        row["quant_err"] = diff(fp[VARIANTS[name][0]], ref)[0]
        try:
            sf = sf_logits(Path(ckpt))
            row["sf_ref"] = diff(sf, ref)
        except Exception as e:
            sf = None
            row["errors"].append(("slimformer.load", f"{type(e).__name__}: {e}"[:400]))
        if direction == "B" and sf is not None:
            row["sf_reload"] = diff(sf, sf_inmem[name].double())[0]  # saved+reloaded vs in memory: expect 0
        for backend, dtype in GQM_LOADS:
            st = g_status.get(f"{ckpt}|{backend}|{dtype}", {"ok": False, "error": "not run"})
            if not st["ok"]:
                row["errors"].append((f"GPTQModel load/forward ({backend},{dtype})", st["error"]))
                continue
            g = torch.load(st["logits"])
            row[f"gqm_{backend}"] = (*diff(g, ref), st["kernel"], dtype)
            if sf is not None:
                row[f"sf_gqm_{backend}"] = diff(sf, g.double())
                row[f"top1_{backend}"] = (sf.argmax(-1) == g.argmax(-1)).float().mean().item()
        numbers_ok = ("sf_ref" in row and row["sf_ref"][1] <= TOL["float32"] and row.get("sf_reload", 0) == 0
                      and all(row[f"gqm_{b}"][1] <= TOL[dt] for b, dt in GQM_LOADS if f"gqm_{b}" in row))
        unexplained = [e for _, e in row["errors"] if not known_limit(e)]
        row["result"] = ("FAIL" if unexplained or not numbers_ok else
                         "ok" if not row["errors"] else "GPTQModel limit")

    total = time.perf_counter() - start
    print_table(rows)
    print(f"\ntimes: GPTQModel quantize {t_gqm_quant:.0f} s, slimformer quantize {t_sf_quant:.0f} s, "
          f"GPTQModel load+logits {t_gqm_load:.0f} s, total {total:.0f} s; work dir {work}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    if tmp is not None:
        tmp.cleanup()
    sys.exit(0 if all(r.get("result") != "FAIL" for r in rows) else 1)


def known_limit(error: str) -> str | None:
    return next((why for text, why in KNOWN_GQM_LIMITS.items() if text in error), None)


def print_table(rows: list[dict]) -> None:
    print("A = GPTQModel quantized -> slimformer loads;  B = slimformer quantized -> GPTQModel loads")
    print("ref = fp64 logits of the dequantized checkpoint; numbers are max|dlogit| (relative = / max|ref|)")
    print(f"GPTQModel loads: {', '.join(f'{b}/{d}' for b, d in GQM_LOADS)}; slimformer: fp32\n")
    head = (f"{'':2}{'variant':15}{'max|ref|':>9}{'quant err':>10}{'sf-ref':>9}{'gqm_t-ref':>10}"
            f"{'gqm_a-ref':>10}  {'auto kernel':22}{'sf-gqm_t':>9}{'rel':>9}{'top1':>6}  result")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "ref_max" not in r:
            print(f"{r['direction']:2}{r['variant']:15}  FAIL  " + "; ".join(f"{w}: {e}" for w, e in r["errors"]))
            continue

        def num(key, i=0):
            v = r.get(key)
            return f"{v[i]:.1e}" if v else "fail"
        auto = r.get("gqm_auto")
        sf_t = r.get("sf_gqm_gptq_torch")
        top1 = r.get("top1_gptq_torch")
        print(f"{r['direction']:2}{r['variant']:15}{r['ref_max']:9.3f}{r['quant_err']:10.3f}{num('sf_ref'):>9}"
              f"{num('gqm_gptq_torch'):>10}{num('gqm_auto'):>10}  {(auto[2] if auto else '-'):22}"
              f"{(f'{sf_t[0]:.1e}' if sf_t else '-'):>9}{(f'{sf_t[1]:.1e}' if sf_t else '-'):>9}"
              f"{(f'{top1:.2f}' if top1 is not None else '-'):>6}  {r['result']}")
        for where, err in r["errors"]:
            why = known_limit(err)
            print(f"{'':4}{where}: {err}" + (f"\n{'':6}-> {why}" if why else ""))
    print("\nsf-ref: slimformer vs reference; gqm_t / gqm_a: GPTQModel gptq_torch / auto backend vs reference; "
          "sf-gqm_t: slimformer vs GPTQModel gptq_torch directly; top1: argmax agreement of those two.")
    b_reload = [r["sf_reload"] for r in rows if "sf_reload" in r]
    if b_reload:
        print(f"B: slimformer in-memory vs saved+reloaded logits, max |d| over variants = {max(b_reload):.1e}")


if __name__ == "__main__":
    main()
