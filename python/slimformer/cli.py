"""The ``slimformer`` command line.

::

    slimformer info                      what this build contains and what this machine runs
    slimformer bench gptq [options]      GPTQ kernel vs torch dense and torch int4 (see --help)

Adding a command: write ``_add_<name>(subparsers)`` that creates its parser and sets
``func=<callable(args) -> int>`` with ``set_defaults``, and append it to ``_COMMANDS``. Commands
import their heavy modules inside ``func`` so that ``slimformer --help`` stays fast. A command
group with its own subcommands (like ``bench``) adds a nested subparser set; new benchmarks go
into ``_BENCHMARKS``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable, Sequence


def _run_info(args: argparse.Namespace) -> int:
    from .info import main as info_main

    info_main()
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show what this slimformer build contains and what this machine runs",
                       description="Show the slimformer build (compiled CPU ISAs, CUDA archs, torch "
                                   "version) and this machine's runtime facts.")
    p.set_defaults(func=_run_info)


# -- bench ------------------------------------------------------------------------------------
def _add_bench_gptq(bsub) -> None:
    from .bench import gptq

    p = bsub.add_parser("gptq", help=gptq.SUMMARY, description=gptq.DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    gptq.add_arguments(p)
    p.set_defaults(func=lambda args: gptq.run_cli(args))


_BENCHMARKS: list[Callable] = [_add_bench_gptq]


def _fill_bench(p: argparse.ArgumentParser) -> None:
    bsub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for add in _BENCHMARKS:
        add(bsub)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a kernel benchmark (writes JSON + markdown results)",
                       description="Kernel benchmarks: warm-up, median of reps, side by side with the "
                                   "torch baselines in the same run.")
    _fill_bench(p)


# Later: _add_quantize, _add_eval, _add_demo.
_COMMANDS: list[Callable] = [_add_info, _add_bench]


def build_parser(prog: str = "slimformer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="slimformer: make pre-trained transformers smaller and faster in place.")
    try:
        from . import __version__ as version
    except Exception:  # noqa: BLE001 (a broken build should still print --help)
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def _dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None, prog: str) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = f"{prog} {shlex.join(argv)}".strip()
    return int(args.func(args) or 0)


def main(argv: Sequence[str] | None = None, prog: str = "slimformer") -> int:
    """Entry point of the ``slimformer`` console script (and ``python -m slimformer``)."""
    return _dispatch(build_parser(prog), argv, prog)


def bench_main(argv: Sequence[str] | None = None, prog: str = "slimformer bench") -> int:
    """``python -m slimformer.bench``: the ``bench`` command group on its own."""
    parser = argparse.ArgumentParser(prog=prog, description="slimformer kernel benchmarks.")
    _fill_bench(parser)
    return _dispatch(parser, argv, prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m slimformer.cli"))
