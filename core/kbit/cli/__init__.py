"""The ``kbit`` command line (also ``python -m kbit``).

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; the parser's
``run`` default returns the process exit code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .._version import __version__
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``kbit`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.run(args))
