"""Conformance cases, one module per op family, found by listing this package.

A family module ``<family>.py`` (no leading underscore) defines:

- ``FAMILY``: the family's name in ``kbit._opnames.OP_FAMILIES``;
- ``CASES``: one :class:`~._spec.OpCases` per op of the family;
- ``GOLDENS`` (optional): :class:`~._spec.GoldenCheck` s against the golden vectors.

Dropping such a module in this package is all it takes for the conformance suite, ``kbit
conformance`` and ``kbit check`` to cover the family. Shared building blocks live in
``_spec.py``.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType

from ..._opnames import OP_FAMILIES
from ._spec import GoldenCheck, OpCases

__all__ = ["op_cases", "golden_checks", "family_modules"]


@functools.cache
def family_modules() -> tuple[ModuleType, ...]:
    """Every family case module in this package, imported, sorted by name."""
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if family not in OP_FAMILIES:
            raise ValueError(f"case module {module.__name__}: FAMILY={family!r} is not one of {sorted(OP_FAMILIES)}")
        for cases in module.CASES:
            if cases.op not in OP_FAMILIES[family]:
                raise ValueError(f"case module {module.__name__}: {cases.op!r} is not an op of family {family!r}")
        modules.append(module)
    return tuple(modules)


@functools.cache
def op_cases() -> dict[str, OpCases]:
    """The case spec of every op that has one, by op name."""
    table: dict[str, OpCases] = {}
    for module in family_modules():
        for cases in module.CASES:
            if cases.op in table:
                raise ValueError(f"op {cases.op!r} has cases in more than one module")
            table[cases.op] = cases
    return table


@functools.cache
def golden_checks() -> dict[str, GoldenCheck]:
    """Golden-vector checks by op name."""
    return {check.op: check for module in family_modules() for check in getattr(module, "GOLDENS", ())}
