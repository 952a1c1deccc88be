"""``kbit info``: every discovered backend, its state and what it serves."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import warnings

import torch

from .. import backends
from .._opnames import OP_FAMILIES
from ..backends._registry import REGISTRY, SETTINGS, BackendRecord
from .._version import __version__
from ._table import render_table

def _environment() -> list[str]:
    """The registry's settings, then any other ``KBIT_*`` variable that is set (a backend's
    own switch, such as ``KBIT_CUDA_EMULATE``): a bug report shows the whole configuration."""
    return list(SETTINGS) + sorted(name for name in os.environ if name.startswith("KBIT_") and name not in SETTINGS)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="list discovered backends with state, devices, ops and errors")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    # info reports invalid KBIT_* settings instead of refusing to run (see kbit.cli).
    parser.set_defaults(run=run, reports_settings=True)


def _devices(record: BackendRecord, fallback: str | None) -> str:
    devices = ",".join(record.device_types) or "-"
    return f"{devices} (+ fallback on any device)" if record.name == fallback else devices


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
    problems = REGISTRY.setting_problems()
    # Calls nothing else serves run on the reference on any device (unless KBIT_FALLBACK=error).
    fallback = REGISTRY.fallback_backend()
    if args.json:
        payload = {
            "kbit": __version__,
            "torch": torch.__version__,
            "environment": {name: os.environ.get(name) for name in _environment()},
            "settings_problems": [dataclasses.asdict(problem) for problem in problems],
            "backends": [
                {
                    "name": r.name,
                    "distribution": r.distribution,
                    "version": r.version,
                    "state": r.state,
                    "reason": r.reason,
                    "priority": r.priority,
                    "device_types": list(r.device_types),
                    "fallback_for_other_devices": r.name == fallback,
                    "ops": list(r.ops),
                }
                for r in records
            ],
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(f"kbit {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    for name in _environment():
        flags = "; ".join(problem.problem for problem in problems if problem.variable == name)
        if os.environ.get(name) or flags:
            print(f"{name}={os.environ.get(name, '')}" + (f"  <- {flags}" if flags else ""))
    rows = [
        (
            r.name,
            r.distribution or "-",
            r.version or "-",
            r.state or "-",
            _devices(r, fallback),
            _ops_summary(r.ops),
            r.reason or "",
        )
        for r in records
    ]
    print(render_table(("NAME", "DISTRIBUTION", "VERSION", "STATE", "DEVICES", "OPS", "REASON"), rows))
    if not records:
        print("no backends found: is kbit installed (pip install -e .)?")
    return 0
