"""Tests that need the real ecosystem: transformers, peft, accelerate and kbit's
``bitsandbytes`` compatibility package (``pip install -e ".[integration]"
./plugins/bitsandbytes-compat``, as the README's test command does).

Without them the tests skip, saying what to install; under CI (``CI=true``) they fail
instead, so a missing install step cannot hide behind a skip.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

INSTALL_HINT = 'pip install -e ".[integration]" ./plugins/bitsandbytes-compat'


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI must install it ({INSTALL_HINT})")
    pytest.skip(f"{reason} ({INSTALL_HINT})")


def require(name: str) -> ModuleType:
    """Import ``name`` (transformers, peft, ...), or skip (fail under CI) saying why."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        _unavailable(f"{name} is not installed: {exc}")
        raise  # unreachable: skip and fail raise


def require_compat() -> ModuleType:
    """The ``bitsandbytes`` package, which must be kbit's compatibility package."""
    bitsandbytes = require("bitsandbytes")
    if not getattr(bitsandbytes, "__version__", "").endswith("+kbit"):
        _unavailable(f"the installed bitsandbytes ({getattr(bitsandbytes, '__version__', '?')}) is not kbit's")
    return bitsandbytes
