"""Test support for kbit and for backend authors.

- :class:`BackendConformance`: subclass it in a test file to run kbit's conformance suite
  against a backend (``kbit conformance NAME`` does the same without a test file); see
  ``docs/backend-authors.md``.
- :mod:`kbit.testing.tolerances`: the one table of numerical quality bars and comparison
  tolerances every kbit test and every backend's conformance run compares against.

``BackendConformance`` needs pytest and is imported on first access, so ``import
kbit.testing`` works without pytest.
"""

from typing import Any

from . import tolerances
from .tolerances import Tolerance

__all__ = ["BackendConformance", "Tolerance", "tolerances"]


def __getattr__(name: str) -> Any:
    if name == "BackendConformance":
        from ._conformance import BackendConformance

        return BackendConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
