"""The ``kbit`` command line (also ``python -m kbit``).

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; the parser's
``run`` default returns the process exit code. Exit codes: 0 success, 1 a check or a
conformance run found problems, 2 the command could not run as asked (a bad argument, an
invalid ``KBIT_*`` setting, any other kbit error). Errors are one line on stderr, never a
traceback; output into a pipe whose reader has gone (``kbit info | head -3``) ends quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .._errors import KbitError
from .._version import __version__
from ..backends._registry import REGISTRY
from . import _bench, _check, _conformance, _demo, _info

_COMMANDS = (_info, _check, _conformance, _demo, _bench)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kbit`` command."""
    parser = argparse.ArgumentParser(prog="kbit", description="k-bit quantization runtime for PyTorch")
    parser.add_argument("--version", action="version", version=f"kbit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(subparsers)
    return parser


def _run(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    prefix = f"kbit {args.command}"
    try:
        # Every command but `info` (which lists them) needs settings kbit calls can run with.
        if not getattr(args, "reports_settings", False):
            fatal = [problem for problem in REGISTRY.setting_problems() if problem.fatal]
            for problem in fatal:
                print(f"{prefix}: {problem.variable}={problem.value!r}: {problem.problem}", file=sys.stderr)
            if fatal:
                return 2
        return int(args.run(args))
    except KbitError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 2


def _discard_stdout() -> None:
    """Point stdout at the null device, so the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (captured output): nothing to flush
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``kbit`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # also after --help's SystemExit: a closed pipe surfaces here, not at exit
    except BrokenPipeError:
        _discard_stdout()
        return 1
