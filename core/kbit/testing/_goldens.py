"""Finding and loading the golden vectors for the conformance suite.

The vectors are never shipped with kbit. They are looked up, in order: the
``--kbit-goldens`` option, the ``KBIT_GOLDENS`` environment variable, then
``../shared/spec/goldens`` next to the pytest root directory, the current directory and
the kbit source checkout. Each may name ``goldens.pt`` or the directory holding it.

Where they are not found, golden tests skip, saying where they looked, unless
``KBIT_REQUIRE_GOLDENS=1`` is set (as CI does): then a missing file fails the test, so a
run can never pass with the interoperability checks silently skipped.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Optional

__all__ = ["ENV_VAR", "REQUIRE_ENV_VAR", "find_goldens", "goldens_required", "load_goldens", "missing_goldens"]

ENV_VAR = "KBIT_GOLDENS"
#: Set to ``1`` to make missing golden vectors a failure instead of a skip.
REQUIRE_ENV_VAR = "KBIT_REQUIRE_GOLDENS"
FILE_NAME = "goldens.pt"
_RELATIVE = Path("..") / "shared" / "spec" / "goldens"


def _as_file(path: Path) -> Path:
    return path / FILE_NAME if path.is_dir() else path


def find_goldens(option: Optional[str] = None, rootdir: Optional[Path] = None) -> tuple[Optional[Path], str]:
    """``(path to goldens.pt, "")`` when found, else ``(None, why not)``.

    An explicitly given location (option or environment) that does not exist is not
    replaced by a guess: the caller asked for that file.
    """
    explicit = option or os.environ.get(ENV_VAR)
    if explicit:
        path = _as_file(Path(explicit).expanduser())
        return (path, "") if path.is_file() else (None, f"golden vectors not found at {path}")
    import kbit

    source_checkout = Path(kbit.__file__).resolve().parents[2]
    bases = [base for base in (rootdir, Path.cwd(), source_checkout) if base is not None]
    candidates = list(dict.fromkeys((base / _RELATIVE).resolve() for base in bases))
    for candidate in candidates:
        path = _as_file(candidate)
        if path.is_file():
            return path, ""
    tried = ", ".join(str(candidate) for candidate in candidates)
    return None, f"golden vectors not found (tried {tried}); pass --kbit-goldens PATH or set {ENV_VAR}"


def goldens_required() -> bool:
    """Whether ``KBIT_REQUIRE_GOLDENS`` asks for missing goldens to fail (``1``/``true``/``yes``)."""
    value = os.environ.get(REQUIRE_ENV_VAR, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"{REQUIRE_ENV_VAR}={value!r} is not supported (expected 1 or 0)")


def missing_goldens(why_not: str) -> None:
    """Skip the calling pytest test because the goldens are missing, or fail it when they are required."""
    import pytest

    if goldens_required():
        pytest.fail(f"{why_not} ({REQUIRE_ENV_VAR} is set: the golden checks must run)", pytrace=False)
    pytest.skip(why_not)


@functools.cache
def load_goldens(path: Path) -> dict[str, Any]:
    """The golden vectors in ``path`` (loaded once per process)."""
    import torch

    return torch.load(path, weights_only=True)
