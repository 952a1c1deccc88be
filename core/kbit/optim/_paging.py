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

from .._errors import KbitError, KbitWarning
from ..backend import Backend
from ..backends._registry import REGISTRY

__all__ = ["KbitPagedMemoryWarning", "PAGED_MEMORY_FEATURE", "PagedAllocator"]

#: Manifest feature of backends that can allocate paged state (``Backend.paged_zeros``).
PAGED_MEMORY_FEATURE = "paged_memory"


class KbitPagedMemoryWarning(KbitWarning):
    """A paged optimizer runs with ordinary memory because its backend has no managed memory."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` that attributes a warning to the first caller outside kbit.optim."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        frame, level = frame.f_back, level + 1
    return level


class PagedAllocator:
    """Allocates an optimizer's state tensors, paged where the serving backend can.

    ``op`` and ``kind`` say which backend to ask (the one that serves the optimizer's update
    op for each device type of ``params``).
    """

    def __init__(self, owner: str, params: Iterable[torch.Tensor], op: str, kind: str) -> None:
        self._backends: dict[str, Optional[Backend]] = {}
        unpaged = []
        for p in params:
            device_type = p.device.type
            if device_type in self._backends:
                continue
            backend, name = self._paging_backend(op, device_type, p.dtype, kind)
            self._backends[device_type] = backend
            if backend is None:
                unpaged.append(f"{name} on {device_type}")
        if unpaged:
            warnings.warn(
                f"{owner}: no managed memory for paged optimizer state ({', '.join(unpaged)} "
                f"does not declare {PAGED_MEMORY_FEATURE!r}); using ordinary device memory, "
                "with identical results but no paging",
                KbitPagedMemoryWarning,
                stacklevel=_stacklevel_outside_package(),
            )

    @staticmethod
    def _paging_backend(op: str, device_type: str, dtype: torch.dtype, kind: str) -> tuple[Optional[Backend], str]:
        try:
            resolution = REGISTRY.resolve(op, device_type, dtype, optimizer=kind)
        except KbitError:
            return None, "no backend"  # the step itself will report why nothing serves it
        manifest = resolution.backend.manifest
        if manifest is not None and PAGED_MEMORY_FEATURE in manifest.features:
            return resolution.backend, resolution.name
        return None, f"backend {resolution.name!r}"

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
        """A zero-filled state tensor on ``like``'s device, paged when possible."""
        backend = self._backends.get(like.device.type)
        if backend is None:
            return torch.zeros(shape, dtype=dtype, device=like.device)
        return backend.paged_zeros(shape, dtype, like.device)
