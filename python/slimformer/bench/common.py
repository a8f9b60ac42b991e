"""Shared benchmark plumbing: timing, machine facts, output folder, JSON + markdown reports."""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = [
    "BUSY_LOAD",
    "CacheFlusher",
    "KernelMismatch",
    "Timing",
    "default_out_dir",
    "fmt_us",
    "is_busy",
    "git_info",
    "machine_facts",
    "markdown_table",
    "publish",
    "parse_ints",
    "parse_shapes",
    "rel_err",
    "repo_root",
    "time_interleaved",
    "write_report",
]


# -- where we are -----------------------------------------------------------------------------
def _is_slimformer_checkout(path: Path) -> bool:
    pyproject = path / "pyproject.toml"
    if not pyproject.is_file() or not (path / "python" / "slimformer").is_dir():
        return False
    try:
        return 'name = "slimformer"' in pyproject.read_text(errors="replace")
    except OSError:
        return False


def repo_root(start: Path | None = None) -> Path | None:
    """The slimformer checkout containing ``start`` (default: the current directory), or None."""
    here = (start or Path.cwd()).resolve()
    for path in (here, *here.parents):
        if _is_slimformer_checkout(path):
            return path
    return None


def _package_checkout() -> Path | None:
    """The checkout the imported slimformer comes from (editable install), or None for a wheel."""
    import slimformer

    return repo_root(Path(slimformer.__file__).resolve().parent)


def default_out_dir() -> Path:
    """``<checkout>/benchmarks/results`` when run from inside a checkout, else ``./slimformer-bench-results``."""
    root = repo_root()
    return root / "benchmarks" / "results" if root else Path.cwd() / "slimformer-bench-results"


def git_info() -> dict:
    """Short commit and dirty flag of the checkout whose code is being benchmarked.

    Prefers the source tree of the imported package (an editable install), then the current
    directory's checkout; "unknown" outside a git checkout (an installed wheel).
    """
    for root in (_package_checkout(), repo_root()):
        if root is None:
            continue
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if commit:
            return {"commit": commit, "dirty": bool(status.strip()), "checkout": str(root)}
    return {"commit": "unknown", "dirty": None, "checkout": None}


# CPU features that decide which kernels run (ours and torch's/oneDNN's); listed in the report.
_SIMD_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
               "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def _cpuinfo_first() -> dict:
    """Fields of the first processor in /proc/cpuinfo (empty off Linux)."""
    fields: dict = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_facts() -> dict:
    info = _cpuinfo_first()
    flags = set((info.get("flags") or info.get("features") or "").split())
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine() or "unknown",
        "cpu_family_model": (f"family {info['cpu family']} model {info.get('model', '?')}"
                             if "cpu family" in info else None),
        "cpu_simd": [f for f in _SIMD_FLAGS if f in flags],
    }


def machine_facts(device: str) -> dict:
    """CPU/GPU, threads, versions, commit, date: everything needed to read a number later."""
    import slimformer
    from slimformer import _C

    facts = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        **_cpu_facts(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "slimformer": slimformer.__version__,
        "active_cpu_isa": _C.active_cpu_isa(),
        "compiled_cpu_isas": list(_C.compiled_cpu_isas),
        "cuda_kernels_compiled": bool(_C.has_cuda_kernels),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "cuda_runtime": torch.version.cuda if device == "cuda" else None,
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    facts.update({f"git_{k}": v for k, v in git_info().items()})
    return facts


# -- timing -----------------------------------------------------------------------------------
class Timing:
    """Median/min/max of per-call times in microseconds."""

    def __init__(self, samples_s: Sequence[float]):
        self.samples_us = [s * 1e6 for s in samples_s]

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    def as_dict(self) -> dict:
        s = self.samples_us
        return {"median_us": self.median_us, "min_us": min(s), "max_us": max(s), "reps": len(s)}


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        # No synchronize before start.record(): the previous call ended with one, and the cache
        # flush queued just before keeps the GPU busy while the host launches fn, so the events
        # time the kernels, not the host's launch latency. (With a sync here, the first H200 run
        # measured ~25-70 us for every variant, dense cuBLAS included: launch cost, not kernels.)
        def time_cuda(fn):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) * 1e-3

        return time_cuda

    def time_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return time_cpu


def _l3_bytes() -> int | None:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip().upper()
    except OSError:
        return None
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    try:
        return int(text.rstrip("KMG")) * scale
    except ValueError:
        return None


class CacheFlusher:
    """Overwrites a buffer larger than the last-level cache, so each timed call reads its weights
    from memory, as in LLM decoding where a layer's weights are read once per token.

    CPU: twice the L3 size (64 MiB when unknown, at least 32 MiB); CUDA: 256 MiB (as
    ``triton.testing.do_bench`` does). Called outside the timed region.
    """

    def __init__(self, device: str):
        if device == "cuda":
            nbytes = 256 * 2**20
        else:
            l3 = _l3_bytes()
            nbytes = min(max(2 * l3, 32 * 2**20), 512 * 2**20) if l3 else 64 * 2**20
        self.nbytes = nbytes
        self._buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
        self._i = 0

    def __call__(self) -> None:
        self._i += 1
        self._buf.fill_(self._i)


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, warmup: int, reps: int,
                     min_reps: int = 3, budget_s: float = 0.0,
                     flush: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time several callables round-robin (one call of each per rep) and return their medians.

    ``warmup`` untimed calls of each first. With ``budget_s > 0`` the rep count is cut, never
    below ``min_reps``, so that all callables together take about ``budget_s`` seconds (the
    slowest shapes would otherwise take minutes); warm-up stops early once it has used a quarter
    of the budget (after at least one call). ``flush`` (e.g. a :class:`CacheFlusher`) runs
    before every timed call, untimed.
    """
    timer = _timer(device)
    flush = flush or (lambda: None)
    names = list(fns)
    per_call = dict.fromkeys(names, 0.0)
    t_start = time.perf_counter()
    for i in range(max(warmup, 1)):
        for n in names:
            flush()
            per_call[n] = timer(fns[n])
        if budget_s > 0 and time.perf_counter() - t_start > budget_s / 4:
            break
    if budget_s > 0:
        reps = max(min_reps, min(reps, int(budget_s / max(sum(per_call.values()), 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            for n in names:
                flush()
                samples[n].append(timer(fns[n]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: Timing(s) for n, s in samples.items()}


# -- reports ----------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one letter per column, "l" or "r" (default: right)."""
    align = align or "r" * len(headers)
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(r, widths, align)) + " |"

    sep = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def write_report(out_dir: Path, stem: str, latest_stem: str, payload: dict, markdown: str) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and the stable ``<latest_stem>.md`` (+ ``.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    written = []
    for name, content in ((f"{stem}.json", text), (f"{stem}.md", markdown),
                          (f"{latest_stem}.md", markdown), (f"{latest_stem}.json", text)):
        path = out_dir / name
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def publish(prefix: str, payload: dict, markdown: str, out_dir: Path | None, write: bool, log=print) -> None:
    """Print the markdown report and (``write``) save it as ``<prefix>_<date>_<commit>`` and
    ``<prefix>_latest`` (.json + .md) in ``out_dir`` (default :func:`default_out_dir`)."""
    log("")
    log(markdown)
    if not write:
        return
    m = payload["machine"]
    commit = m["git_commit"] + ("-dirty" if m["git_dirty"] else "")
    stem = f"{prefix}_{_dt.date.today().isoformat()}_{commit}"
    written = write_report(Path(out_dir) if out_dir is not None else default_out_dir(), stem, f"{prefix}_latest",
                           payload, markdown)
    log("wrote " + ", ".join(str(p) for p in written))


# -- shared by the kernel benchmarks -----------------------------------------------------------
# A 1-minute load average above this before the run starts means someone else is using the CPUs.
BUSY_LOAD = 0.5


class KernelMismatch(RuntimeError):
    """A kernel's output disagrees with its reference: the benchmark must not report it."""


def is_busy(device: str, machine: dict) -> bool:
    """CPU timings only: GPU kernel times hardly depend on the host's load (e.g. a build just before)."""
    load = machine.get("load_avg_1m_at_start")
    return device == "cpu" and load is not None and load > BUSY_LOAD


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        try:
            k, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not KxN (e.g. 4096x11008)") from None
        if k <= 0 or n <= 0:
            raise argparse.ArgumentTypeError(f"shape {item!r} must be positive")
        shapes.append((k, n))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers")
    return values


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


# -- entry points -------------------------------------------------------------------------------
def parse_command_line(add_arguments: Callable[[argparse.ArgumentParser], None], description: str, prog: str,
                       argv: Sequence[str] | None = None) -> argparse.Namespace:
    """A benchmark's stand-alone parser applied to ``argv`` (default sys.argv[1:]); the parsed
    arguments carry ``command_line`` for the report."""
    import shlex
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = f"{prog} {shlex.join(argv)}".strip()
    return args


def guarded_run(run: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Run a kernel benchmark; a wrong kernel or a missing op ends it with exit code 2 and no results."""
    import sys

    try:
        run(args)
    except KernelMismatch as e:
        print(f"\nFATAL: {e}\nNo results written: a benchmark of a wrong kernel is worthless.", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"\nFATAL: an op is not available on --device {getattr(args, 'device', '?')}: "
              f"{str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
