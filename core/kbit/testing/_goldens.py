"""Finding and loading the golden vectors for the conformance suite.

The vectors are never shipped with kbit. They are looked up, in order: the
``--kbit-goldens`` option, the ``KBIT_GOLDENS`` environment variable, then
``../shared/spec/goldens`` next to the pytest root directory, the current directory and
the kbit source checkout. Each may name ``goldens.pt`` or the directory holding it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Optional

__all__ = ["ENV_VAR", "find_goldens", "load_goldens"]

ENV_VAR = "KBIT_GOLDENS"
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


@functools.cache
def load_goldens(path: Path) -> dict[str, Any]:
    """The golden vectors in ``path`` (loaded once per process)."""
    import torch

    return torch.load(path, weights_only=True)
