"""Paged optimizer state: managed memory when the serving backend has it, else plain tensors.

A backend advertises managed (pageable) device memory with the manifest feature
``"paged_memory"`` and implements :meth:`kbit.backend.Backend.paged_zeros`. Paged optimizers
allocate their large state tensors there; on a backend without the feature (the reference
backend) they allocate ordinary tensors, compute the same numbers, and say so with one
:class:`KbitPagedMemoryWarning` per optimizer.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable
from typing import Optional

import torch

from .._errors import KbitPagedMemoryWarning, UnsupportedOpError
from ..backend import Backend
from ..backends._registry import REGISTRY, iter_records

__all__ = ["PAGED_MEMORY_FEATURE", "PagedAllocator", "paged_zeros"]

#: Manifest feature of backends that can allocate paged state (``Backend.paged_zeros``).
PAGED_MEMORY_FEATURE = "paged_memory"


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` that attributes a warning to the first caller outside kbit.optim."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        frame, level = frame.f_back, level + 1
    return level


class PagedAllocator:
    """Allocates an optimizer's state tensors, paged where the serving backend can.

    The backend asked is the one the registry picks for the update op that will use the
    state (``optimizer_update_32bit``, ``..._8bit`` or ``..._8bit_blockwise``, which differ
    per parameter with ``min_8bit_size`` and overrides), for the parameter's device type
    and dtype and the optimizer ``kind``. ``uses`` lists ``(parameter, op)`` pairs known at
    construction: they are resolved at once, so the one warning comes when the optimizer
    is built; pairs that appear later (an override changed a layout) are resolved on first
    allocation.
    """

    def __init__(self, owner: str, uses: Iterable[tuple[torch.Tensor, str]], kind: str) -> None:
        self._owner = owner
        self._kind = kind
        self._backends: dict[tuple[str, torch.dtype, str], Optional[Backend]] = {}
        self._warned = False
        unpaged = [why for p, op in uses for why in [self._resolve(op, p)[1]] if why is not None]
        self._warn(unpaged)

    def _resolve(self, op: str, p: torch.Tensor) -> tuple[Optional[Backend], Optional[str]]:
        """The paging backend for ``op`` on ``p`` (``None``: allocate normally) and, then, why."""
        key = (p.device.type, p.dtype, op)
        if key in self._backends:
            return self._backends[key], None
        try:
            resolution = REGISTRY.resolve(op, p.device.type, p.dtype, optimizer=self._kind)
        except UnsupportedOpError:
            # Nothing serves the op: the step itself will raise and say why. Configuration
            # errors (a named backend that is missing or broken) are not caught: they
            # propagate instead of quietly turning a paged optimizer into an unpaged one.
            backend, why = None, f"no backend for {op} on {p.device.type}"
        else:
            manifest = resolution.backend.manifest
            if manifest is not None and PAGED_MEMORY_FEATURE in manifest.features:
                backend, why = resolution.backend, None
            else:
                backend, why = None, f"backend {resolution.name!r} (serving {op} on {p.device.type})"
        self._backends[key] = backend
        return backend, why

    def _warn(self, unpaged: list[str]) -> None:
        if not unpaged or self._warned:
            return
        self._warned = True
        warnings.warn(
            f"{self._owner}: no managed memory for paged optimizer state ({'; '.join(dict.fromkeys(unpaged))} "
            f"does not declare {PAGED_MEMORY_FEATURE!r}); using ordinary device memory, "
            "with identical results but no paging",
            KbitPagedMemoryWarning,
            stacklevel=_stacklevel_outside_package(),
        )

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor, op: str) -> torch.Tensor:
        """A zero-filled state tensor on ``like``'s device for ``op``, paged when possible."""
        backend, why = self._resolve(op, like)
        if backend is None:
            self._warn([why] if why else [])
            return torch.zeros(shape, dtype=dtype, device=like.device)
        return backend.paged_zeros(shape, dtype, like.device)


def paged_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor in paged memory on ``device``, or an ordinary one with a warning.

    The paged memory comes from the highest-priority available backend for ``device``'s
    type that declares :data:`PAGED_MEMORY_FEATURE`; without one the tensor is ordinary
    and one :class:`KbitPagedMemoryWarning` says so. The result's ``is_paged`` attribute
    tells which it is.
    """
    pagers = [
        record
        for record in iter_records()
        if record.state == "available"
        and device.type in record.device_types
        and PAGED_MEMORY_FEATURE in record.manifest.features
    ]
    if pagers:
        best = max(pagers, key=lambda record: record.priority)
        tensor = best.backend.paged_zeros(shape, dtype, device)
    else:
        warnings.warn(
            f"no backend for {device.type} declares {PAGED_MEMORY_FEATURE!r}: returning an ordinary tensor, "
            "not paged memory",
            KbitPagedMemoryWarning,
            stacklevel=_stacklevel_outside_package() + 1,
        )
        tensor = torch.zeros(shape, dtype=dtype, device=device)
    tensor.is_paged = bool(pagers)
    tensor.page_deviceid = device.index if device.index is not None else 0
    return tensor
