"""Byte counts of what a model and an optimizer really hold in memory.

Tensors are counted once per distinct storage, so tables shared by many layers or
parameters (code books, quantization maps) are not counted over and over.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .._dtensor import local_tensor


def tensors_in(value: object) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts, lists, tuples and objects with ``__dict__``."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from tensors_in(vars(value))


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Total bytes of the distinct storages behind ``tensors`` (of a DTensor, its local shard)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        storage = local_tensor(tensor).untyped_storage()  # a DTensor: this process's shard
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's per-parameter state."""
    return storage_bytes(tensors_in(list(optimizer.state.values())))
