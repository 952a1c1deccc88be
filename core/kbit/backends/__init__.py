"""Find, inspect and choose kbit backends.

Backends are discovered from the ``kbit.backends`` entry-point group the first time any of
these functions (or any quantization call) needs them; ``import kbit`` imports no backend.

>>> import kbit
>>> [(r.name, r.state) for r in kbit.backends.list()]        # doctest: +SKIP
[('cuda', 'unavailable'), ('reference', 'available')]
>>> kbit.backends.resolve("quantize_blockwise", "cpu", "float32", blocksize=256).name
'reference'

Environment variables (read at call time unless noted):

``KBIT_BACKEND=name[,name...]``
    Ordered preference for every device type the named backends serve.
``KBIT_DISABLE_PLUGINS=name[,name...]|all``
    Skip these plugins entirely (``all``: every plugin not shipped with kbit itself).
    Read at discovery; call :func:`reset` after changing it.
``KBIT_FALLBACK=reference|error``
    What happens when no preferred or native backend can serve a call: use the reference
    backend with one warning per op (default), or raise ``NoBackendError``.

A value these do not accept (an entry that is not a backend name, such as
``KBIT_DISABLE_PLUGINS=1``; another fallback policy) makes every call raise
``KbitValueError`` instead of being guessed at; ``kbit info`` flags it.
"""

from __future__ import annotations

import builtins
from typing import Any, Mapping, Optional

import torch

from .._manifest import BackendManifest
from ..backend import Backend
from . import _registry
from ._registry import (
    ENTRY_POINT_GROUP,
    REFERENCE,
    STATES,
    BackendRecord,
    CallLog,
    Resolution,
    record_calls,
    use_backend,
)

__all__ = [
    "BackendRecord",
    "CallLog",
    "Resolution",
    "ENTRY_POINT_GROUP",
    "REFERENCE",
    "STATES",
    "available",
    "get",
    "list",
    "record_calls",
    "register",
    "reset",
    "resolve",
    "use_backend",
]


def list() -> builtins.list[BackendRecord]:  # noqa: A001 - mirrors the documented API name
    """One record per discovered backend (probed), sorted by name.

    Each record has ``name``, ``state`` (``available``, ``unavailable``, ``invalid``,
    ``disabled``), ``reason``, ``version``, ``distribution``, ``device_types``, ``ops`` and
    ``priority``.
    """
    return builtins.list(_registry.iter_records())


def available() -> builtins.list[str]:
    """Names of the backends that are usable in this process, sorted."""
    return [record.name for record in _registry.iter_records() if record.state == "available"]


def get(name: str) -> Backend:
    """The backend instance called ``name``.

    Raises ``BackendNotFoundError`` if no such backend is installed and
    ``BackendUnavailableError`` (with the reason) if it is broken, disabled or unavailable.
    """
    return _registry.REGISTRY.get(name)


def resolve(
    op: str, device_type: str, dtype: Optional[torch.dtype | str] = None, **params: Any
) -> Resolution:
    """Which backend would serve ``op`` for tensors on ``device_type``, and why not the others.

    ``params`` are the capability parameters of the call (``blocksize``, ``quant_type``,
    ``quant_storage``, ``optimizer``). The result's ``name`` and ``backend`` are the choice;
    ``rejected`` lists ``(name, reason)`` for every backend passed over; ``fallback`` says
    whether the reference backend stepped in. Raises ``NoBackendError`` when nothing can
    serve the call under the current ``KBIT_FALLBACK`` policy.
    """
    return _registry.REGISTRY.resolve(op, device_type, dtype, **params)


def register(manifest: BackendManifest | Mapping[str, Any], *, replace: bool = False) -> BackendRecord:
    """Register a backend at run time from its manifest (tests, notebooks).

    Installed plugins should use the ``kbit.backends`` entry-point group instead. The
    registration lasts until :func:`reset`.
    """
    return _registry.REGISTRY.register(manifest, replace=replace)


def reset() -> None:
    """Forget discovered backends, probe results, cached choices and warnings given.

    The next call rediscovers entry points and re-reads ``KBIT_DISABLE_PLUGINS``.
    """
    _registry.REGISTRY.reset()
