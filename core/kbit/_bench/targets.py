"""The performance targets of kbit's CPU backend (issue 12), checked against a bench run.

Each target reads the rows of one case and thread count: the kbit backend under test
(``subject``), and where the target is a ratio, the row it is compared with. Ratios are
of times measured in the same run on the same machine.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from .cases import OPTIMIZERS_8BIT

__all__ = ["TARGETS", "Target", "evaluate"]

Rows = dict[str, dict]  # implementation name -> row, for one case and thread count


@dataclasses.dataclass(frozen=True)
class Target:
    """``measure(rows, subject)`` compared with ``limit`` (``<=`` when ``at_most``)."""

    case: str
    description: str
    measure: Callable[[Rows, str], Optional[float]]
    limit: float
    at_most: bool
    unit: str = "x"


def _time(rows: Rows, name: str) -> Optional[float]:
    row = rows.get(name)
    return row.get("best") if row and not row.get("error") else None


def time_ratio(baseline: str) -> Callable[[Rows, str], Optional[float]]:
    """The subject's time as a multiple of ``baseline``'s (below 1: faster)."""

    def measure(rows: Rows, subject: str) -> Optional[float]:
        mine, theirs = _time(rows, subject), _time(rows, baseline)
        return None if mine is None or not theirs else mine / theirs

    return measure


def speedup_over(baseline: str) -> Callable[[Rows, str], Optional[float]]:
    """How many times faster the subject is than ``baseline``."""

    def measure(rows: Rows, subject: str) -> Optional[float]:
        mine, theirs = _time(rows, subject), _time(rows, baseline)
        return None if not mine or theirs is None else theirs / mine

    return measure


def memcpy_share(rows: Rows, subject: str) -> Optional[float]:
    """The subject's effective bandwidth as a share of memcpy's."""
    row = rows.get(subject)
    return row.get("memcpy_share") if row and not row.get("error") else None


def memory_share(rows: Rows, subject: str) -> Optional[float]:
    """Peak extra memory during a step as a share of the optimizer state."""
    row = rows.get(subject)
    if not row or row.get("peak_extra") is None or not row.get("state_bytes"):
        return None
    return row["peak_extra"] / row["state_bytes"]


def call_microseconds(rows: Rows, subject: str) -> Optional[float]:
    """The subject's time per call in microseconds."""
    mine = _time(rows, subject)
    return None if mine is None else mine * 1e6


def _targets() -> list[Target]:
    targets = [
        Target("optimizer/Adam8bit", "Adam8bit step time / torch Adam(fused=True)", time_ratio("torch"), 1.0, True),
        Target("optimizer/Adam8bit", "Adam8bit peak extra memory / optimizer state", memory_share, 0.05, True, "share"),
    ]
    for name, _ in OPTIMIZERS_8BIT:
        if name != "Adam8bit":
            targets.append(Target(f"optimizer/{name}", f"{name} speedup over bitsandbytes",
                                  speedup_over("bitsandbytes"), 5.0, False))  # fmt: skip
    for op in ("quantize_blockwise", "dequantize_blockwise"):
        for blocksize in (4096, 256):
            case = f"{op}/bs{blocksize}"
            targets.append(Target(case, f"{op} bs={blocksize} speedup over bitsandbytes",
                                  speedup_over("bitsandbytes"), 1.5, False))  # fmt: skip
            targets.append(Target(case, f"{op} bs={blocksize} share of memcpy bandwidth", memcpy_share, 0.40,
                                  False, "share"))  # fmt: skip
    for dtype in ("float32", "bfloat16"):
        targets.append(Target(f"quantize_4bit/{dtype}", f"quantize_4bit {dtype} speedup over bitsandbytes",
                              speedup_over("bitsandbytes"), 10.0, False))  # fmt: skip
        targets.append(Target(f"dequantize_4bit/{dtype}", f"dequantize_4bit {dtype} speedup over bitsandbytes",
                              speedup_over("bitsandbytes"), 2.0, False))  # fmt: skip
    for dtype in ("bfloat16", "float32"):
        targets.append(Target(f"linear4bit/b1/{dtype}", f"Linear4bit batch 1 {dtype}: time / bitsandbytes",
                              time_ratio("bitsandbytes"), 1.0, True))  # fmt: skip
        targets.append(Target(f"linear4bit/b16/{dtype}", f"Linear4bit batch 16 {dtype}: time / dense nn.Linear",
                              time_ratio("torch"), 1.0, True))  # fmt: skip
    targets.append(Target("small_call", "4096-element quantize_blockwise, end to end", call_microseconds, 30.0, True,
                          "us"))  # fmt: skip
    return targets


TARGETS: tuple[Target, ...] = tuple(_targets())


def evaluate(rows_by_case: dict[str, Rows], subject: str) -> list[dict]:
    """Every target whose case was run: its measured value and whether it is met (None:
    the value could not be measured, e.g. bitsandbytes was not available)."""
    results = []
    for target in TARGETS:
        rows = rows_by_case.get(target.case)
        if rows is None:
            continue
        value = target.measure(rows, subject)
        met = None if value is None else (value <= target.limit if target.at_most else value >= target.limit)
        results.append({
            "case": target.case, "target": target.description, "value": value, "limit": target.limit,
            "at_most": target.at_most, "unit": target.unit, "met": met,
        })  # fmt: skip
    return results
