"""``kbit check``: a quick self-test of every available backend against the reference."""

from __future__ import annotations

import argparse

from .. import backends
from .._selftest import run_checks
from ._table import render_table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("check", help="self-test every available backend against the reference")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    reference = backends.get(backends.REFERENCE)
    results = []
    for name in backends.available():
        results.extend(run_checks(backends.get(name), reference))
    rows = [(r.backend, r.op, r.status, str(r.compared), r.detail) for r in results]
    print(render_table(("BACKEND", "OP", "RESULT", "COMPARED", "DETAIL"), rows))
    failures = [r for r in results if r.status != "passed"]
    compared = sum(r.compared for r in results)
    print(f"{len(results) - len(failures)} checks passed, {len(failures)} failed; {compared} results compared numerically")
    return 1 if failures else 0
