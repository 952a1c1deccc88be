"""``kbit info``: every discovered backend, its state and what it serves."""

from __future__ import annotations

import argparse
import json
import os
import platform
import warnings

import torch

from .. import backends
from .._opnames import OP_FAMILIES
from .._version import __version__
from ._table import render_table

_ENV_VARS = ("KBIT_BACKEND", "KBIT_DISABLE_PLUGINS", "KBIT_FALLBACK", "KBIT_CUDA_EMULATE")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="list discovered backends with state, devices, ops and errors")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.set_defaults(run=run)


def _ops_summary(ops: tuple[str, ...]) -> str:
    declared = set(ops)
    parts = []
    for family, names in OP_FAMILIES.items():
        count = len(declared.intersection(names))
        if count:
            parts.append(f"{family} {count}/{len(names)}")
    return ", ".join(parts) or "-"


def run(args: argparse.Namespace) -> int:
    # Plugin problems are reported in the table; repeating them as warnings adds noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = backends.list()
    if args.json:
        payload = {
            "kbit": __version__,
            "torch": torch.__version__,
            "environment": {name: os.environ.get(name) for name in _ENV_VARS},
            "backends": [
                {
                    "name": r.name,
                    "distribution": r.distribution,
                    "version": r.version,
                    "state": r.state,
                    "reason": r.reason,
                    "priority": r.priority,
                    "device_types": list(r.device_types),
                    "ops": list(r.ops),
                }
                for r in records
            ],
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(f"kbit {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    for name in _ENV_VARS:
        if os.environ.get(name):
            print(f"{name}={os.environ[name]}")
    rows = [
        (
            r.name,
            r.distribution or "-",
            r.version or "-",
            r.state or "-",
            ",".join(r.device_types) or "-",
            _ops_summary(r.ops),
            r.reason or "",
        )
        for r in records
    ]
    print(render_table(("NAME", "DISTRIBUTION", "VERSION", "STATE", "DEVICES", "OPS", "REASON"), rows))
    if not records:
        print("no backends found: is kbit installed (pip install -e .)?")
    return 0
