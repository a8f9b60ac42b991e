#!/usr/bin/env bash
# GPU check (GUIDE.md section 6), one call on the GPU machine, about 8 minutes at most:
#   build for the local arch only -> build info -> CUDA tests -> sparse attention kernels -> compute-sanitizer memcheck ->
#   token merging tests + memcheck ->
#   GPU benchmarks (GPTQ, binary, sparse attention, token merging) -> CPU tests -> racecheck / initcheck of the shared-memory kernel (if time is left)
# and a report (report.md, report.json, logs/) under $OUT (default ./gpu_report). Every step has a
# time limit within a total budget; a failing step is recorded, never fatal. Without a GPU the GPU
# steps are recorded as skipped ("no GPU"), so the script can be dry-run anywhere.
#
#   bash scripts/gpu_check.sh                        # from any directory
#   OUT=/tmp/r PYTHON=/path/to/python GPU_CHECK_BUDGET_S=300 bash scripts/gpu_check.sh
#   SLIMFORMER_CUDA_ARCHS=90a bash scripts/gpu_check.sh   # instead of the detected arch
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu_report}
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}  # all steps together; leaves room under 8 minutes
START=$(date +%s)
mkdir -p "$OUT/logs"
STEPS="$OUT/logs/steps.tsv"
: >"$STEPS"

record() {  # NAME STATUS SECONDS SUMMARY
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ' | cut -c1-200)" >>"$STEPS"
}

# The line that best summarises a step's log: pytest's result line, else the last non-empty line.
summary_of() {
  local line
  line=$(grep -E '([0-9]+ (passed|failed|error|errors|skipped|deselected))|ERROR SUMMARY|no GPU|^cuda device' "$1" |
    tail -n 1)
  [[ -z "$line" ]] && line=$(grep -v '^[[:space:]]*$' "$1" | tail -n 1)
  printf '%s' "$line" | sed -E 's/^=+ //; s/ =+$//'
}

# run_step NAME LIMIT_S CMD...: CMD under `timeout`, output to logs/NAME.log, outcome recorded.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    record "$name" skip 0 "out of time (budget ${BUDGET_S}s)"
    return 1
  fi
  local log="$OUT/logs/$name.log" t0 rc status
  echo "== $name (limit ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  case $rc in
    0) status=pass ;;
    124 | 137) status=timeout ;;
    *) status=fail ;;
  esac
  record "$name" "$status" $(($(date +%s) - t0)) "$(summary_of "$log") (rc=$rc)"
  tail -n 2 "$log" | sed 's/^/   /'
  return $rc
}

skip_step() { record "$1" skip 0 "$2"; }

# -- the machine --------------------------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)"
  echo "python: $PY ($("$PY" --version 2>&1))"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total \
    --format=csv 2>&1
} >"$OUT/logs/env.log" 2>&1

# "90" for sm_90 when torch sees a GPU, else empty.
CC=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else '')" \
  2>/dev/null | tail -n 1)
GPU_NAME=""
if [[ -n "$CC" ]]; then
  GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null)
  # Arch-specific targets (sm_90a ...) from Hopper on; this build runs on this card only.
  ARCH=${SLIMFORMER_CUDA_ARCHS:-$CC$( ((${CC:0:-1} >= 9)) && echo a)}
else
  ARCH=""
fi
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
echo "gpu: ${GPU_NAME:-none} arch: ${ARCH:-none} python: $PY out: $OUT"

# With pytest-xdist, a test that crashes the interpreter loses one worker, not the rest of the run
# (the first H200 run lost the CUDA and CPU test results behind one segfault).
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)

# -- steps --------------------------------------------------------------------------------------
if [[ -n "$CC" ]]; then
  run_step build 240 env SLIMFORMER_CUDA=ON SLIMFORMER_CUDA_ARCHS="$ARCH" PIP_BREAK_SYSTEM_PACKAGES=1 \
    "$PY" -m pip install --no-build-isolation --no-deps -v . --config-settings=build-dir=build/gpu-check
  grep -E 'ptxas info|Compiling entry|bytes stack frame' "$OUT/logs/build.log" >"$OUT/logs/ptxas.log" || true
else
  skip_step build "no GPU"
fi

run_step info 60 "$PY" -m slimformer.info

if [[ -n "$CC" ]]; then
  # tests/test_tome_cuda.py runs in its own `tome` step below.
  run_step cuda_tests 180 "$PY" -m pytest -m cuda -q -p no:cacheprovider "${XDIST[@]}" tests \
    --ignore=tests/test_tome_cuda.py --junitxml="$OUT/logs/cuda_tests.xml"
else
  skip_step cuda_tests "no GPU"
fi

# Sparse attention: tests/test_sparse_attention_cuda.py (marker `cuda`) already ran in cuda_tests; this
# step runs every sparse kernel once on its own (tensor-core and SIMT forward, SIMT backward) so that a
# verdict on them appears in the table even when cuda_tests times out or crashes.
if [[ -n "$CC" ]]; then
  run_step sparse_attention 60 "$PY" scripts/gpu_memcheck.py --only sparse
else
  skip_step sparse_attention "no GPU"
fi

MEMCHECK_ENV=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)  # one allocation per tensor: exact bounds
if [[ -z "$CC" ]]; then
  skip_step memcheck "no GPU"
elif [[ -z "$SANITIZER" ]]; then
  skip_step memcheck "compute-sanitizer not found"
else
  run_step memcheck 150 "${MEMCHECK_ENV[@]}" "$SANITIZER" --tool memcheck --error-exitcode 86 --print-limit 20 \
    "$PY" scripts/gpu_memcheck.py
fi

# Token merging: the CUDA kernels against the bit-exact host replays, the fp64 reference and the CPU ops
# (tests/test_tome_cuda.py; its replay half, tests/test_tome_cuda_math.py, runs in cpu_tests), then every
# tome kernel once under compute-sanitizer memcheck (racecheck / initcheck below run them too).
if [[ -n "$CC" ]]; then
  run_step tome 120 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests/test_tome_cuda.py \
    --junitxml="$OUT/logs/tome_tests.xml"
else
  skip_step tome "no GPU"
fi
if [[ -z "$CC" ]]; then
  skip_step tome_memcheck "no GPU"
elif [[ -z "$SANITIZER" ]]; then
  skip_step tome_memcheck "compute-sanitizer not found"
else
  run_step tome_memcheck 90 "${MEMCHECK_ENV[@]}" "$SANITIZER" --tool memcheck --error-exitcode 86 --print-limit 20 \
    "$PY" scripts/gpu_memcheck.py --only tome
fi

if [[ -z "$CC" ]]; then
  skip_step bench "no GPU"
elif ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('slimformer.bench.gptq') is None)" \
  2>/dev/null; then
  skip_step bench "slimformer.bench.gptq not found"
else
  run_step bench 150 "$PY" -m slimformer.bench gptq --device cuda --out "$OUT/bench"
fi
if [[ -z "$CC" ]]; then
  skip_step bench_binary "no GPU"
else
  run_step bench_binary 90 "$PY" -m slimformer.bench binary --device cuda --budget 1.5 --out "$OUT/bench_binary"
fi

# Sparse attention vs dense SDPA / masked SDPA / FlexAttention (fp16): the issue's n = 16k, w = 512 cell and
# n = 4k, d 64 and 128. Kept small: every FlexAttention shape is a fresh Triton compile.
if [[ -z "$CC" ]]; then
  skip_step bench_sparse "no GPU"
else
  run_step bench_sparse 120 "$PY" -m slimformer.bench sparse --device cuda --lengths 4096,16384 --windows 512 \
    --head-dims 64,128 --budget 2 --out "$OUT/bench_sparse"
fi

# Token merging: ViT-B/16 and DeiT-S images/s vs the unpatched HF model (fp16), r = 0 / 16, batch 32.
if [[ -z "$CC" ]]; then
  skip_step bench_tome "no GPU"
else
  run_step bench_tome 90 "$PY" -m slimformer.bench tome --device cuda --batches 32 --rs 0,16 --rounds 5 \
    --out "$OUT/bench_tome"
fi

run_step cpu_tests 120 "$PY" -m pytest -m "not cuda" -q -p no:cacheprovider "${XDIST[@]}" tests

for tool in racecheck initcheck; do  # the shared-memory kernels (gemv, sparse, tome) and their workspaces
  if [[ -z "$CC" ]]; then
    skip_step "$tool" "no GPU"
  elif [[ -z "$SANITIZER" ]]; then
    skip_step "$tool" "compute-sanitizer not found"
  else
    run_step "$tool" 90 "${MEMCHECK_ENV[@]}" "$SANITIZER" --tool "$tool" --error-exitcode 86 --print-limit 20 \
      "$PY" scripts/gpu_memcheck.py --only gemv
  fi
done

# -- report -------------------------------------------------------------------------------------
"$PY" - "$OUT" "$GPU_NAME" "$ARCH" "$(($(date +%s) - START))" <<'EOF'
import json, re, subprocess, sys
from pathlib import Path

out, gpu, arch, total = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
logs = out / "logs"
steps = [dict(zip(("step", "status", "seconds", "summary"), line.split("\t", 3)))
         for line in (logs / "steps.tsv").read_text().splitlines() if line]
for s in steps:
    s["seconds"] = int(s["seconds"])

def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None

ptxas = None
if (logs / "ptxas.log").exists():
    text = (logs / "ptxas.log").read_text()
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    stack = [int(s) for s in re.findall(r"(\d+) bytes stack frame", text)]
    if regs:
        ptxas = {"kernels": len(regs), "max_registers": max(regs),
                 "kernels_spilling": sum(1 for s in spills if s), "kernels_with_stack": sum(1 for s in stack if s)}

facts = {}
for line in (logs / "info.log").read_text().splitlines() if (logs / "info.log").exists() else []:
    key, _, value = line.partition("  ")
    if value.strip():
        facts[key.strip()] = value.strip()

bench_md = [p for d in ("bench", "bench_binary", "bench_sparse", "bench_tome") if (out / d).exists()
            for p in sorted((out / d).glob("*_latest.md"))]
report = {
    "date": subprocess.run(["date", "-u", "+%FT%TZ"], capture_output=True, text=True).stdout.strip(),
    "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
    "gpu": gpu or None, "cuda_arch": arch or None, "total_seconds": total,
    "build_info": facts, "ptxas": ptxas, "steps": steps,
    "bench_reports": [str(p.relative_to(out)) for p in bench_md],
}
(out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

table = ["| step | status | s | summary |", "|---|---|---:|---|"]
table += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['summary'].replace('|', '/')} |" for s in steps]
md = [f"# slimformer GPU check", "",
      f"- date: {report['date']}", f"- commit: {report['commit'] or 'unknown'}{' (dirty)' if report['dirty'] else ''}",
      f"- GPU: {gpu or 'none (no GPU: GPU steps skipped)'}, arch {arch or '-'}",
      f"- torch: {facts.get('torch (running)', '?')}, total {total} s", ""]
if ptxas:
    md += [f"- ptxas: {ptxas['kernels']} kernels, max {ptxas['max_registers']} registers, "
           f"{ptxas['kernels_spilling']} spilling, {ptxas['kernels_with_stack']} with a stack frame", ""]
md += table
for p in bench_md:
    md += ["", f"## Benchmark: {p.parent.name}", "", p.read_text()]
(out / "report.md").write_text("\n".join(md) + "\n")
print("\n" + "\n".join(table))
print(f"\nreport: {out / 'report.md'}")
EOF
