"""What kbit needs to know about ``torch.distributed`` tensors (DTensor), without importing them.

FSDP2 (``fully_shard``) turns parameters into DTensors: each rank holds a local shard and
the DTensor describes the whole. A DTensor can only exist once ``torch.distributed.tensor``
has been imported, so :func:`is_dtensor` looks the class up in ``sys.modules`` instead of
importing it: ``import kbit`` stays free of the distributed stack, and PyTorch builds
without it work unchanged.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

__all__ = ["dtensor_class", "is_dtensor", "local_tensor"]


def dtensor_class() -> Optional[type]:
    """``torch.distributed.tensor.DTensor`` if that module was imported, else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a DTensor (False, cheaply, when no DTensor can exist yet)."""
    cls = dtensor_class()
    return cls is not None and isinstance(value, cls)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage), or ``tensor`` itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor
