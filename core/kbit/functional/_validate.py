"""Argument checks shared by the public functions: one place, one message style.

Every check raises a typed kbit error that names the op, the argument and the bad value.
They run once, in the public API; backends receive arguments that already passed.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .._errors import KbitTypeError, KbitValueError
from .._formats import FLOAT_DTYPES, dtype_name


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(dtype_name(d) for d in dtypes)


def check_tensor(op: str, name: str, value: object) -> torch.Tensor:
    """Require a ``torch.Tensor``."""
    if not isinstance(value, torch.Tensor):
        raise KbitTypeError(op, name, f"type {type(value).__name__}", "a torch.Tensor")
    return value


def check_dtype(op: str, name: str, tensor: object, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """Require a tensor whose dtype is one of ``allowed``."""
    tensor = check_tensor(op, name, tensor)
    if tensor.dtype not in allowed:
        raise KbitTypeError(op, name, f"dtype {tensor.dtype}", f"one of {_names(allowed)}")
    return tensor


def check_choice(op: str, name: str, value: object, allowed: Sequence[object]) -> None:
    """Require ``value`` to be one of ``allowed`` (an int check rejects bools)."""
    if isinstance(value, bool) or value not in allowed:
        raise KbitValueError(op, name, value, f"expected one of {list(allowed)}")


def check_numel(op: str, name: str, tensor: torch.Tensor, expected: int) -> None:
    """Require ``tensor`` to hold exactly ``expected`` elements."""
    if tensor.numel() != expected:
        raise KbitValueError(op, f"{name}.numel()", tensor.numel(), f"expected {expected}")


def check_code(op: str, code: object, max_size: int = 256) -> torch.Tensor:
    """Require a 1-D float32 code table with at most ``max_size`` entries."""
    code = check_dtype(op, "code", code, (torch.float32,))
    if code.dim() != 1 or not 0 < code.numel() <= max_size:
        raise KbitValueError(op, "code.shape", tuple(code.shape), f"expected a 1-D table of 1..{max_size} values")
    return code


def check_buffer(
    op: str, name: str, buffer: object, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> None:
    """Require an optional caller-provided buffer (``out=``, ``absmax=``) to match the result.

    ``None`` passes. Ops check every buffer they accept before computing or writing, so
    a bad one leaves all of them untouched.
    """
    if buffer is None:
        return
    buffer = check_tensor(op, name, buffer)
    if tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype or buffer.device != device:
        raise KbitValueError(
            op,
            name,
            f"tensor{tuple(buffer.shape)} {buffer.dtype} on {buffer.device}",
            f"expected shape {tuple(shape)}, dtype {dtype}, device {device}",
        )


def store_into(op: str, name: str, result: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """Copy ``result`` into a caller-provided buffer (``out=``, ``absmax=``) and return it.

    Without a buffer ``result`` is returned as is. A buffer of the wrong shape, dtype or
    device raises before anything is written to it.
    """
    if buffer is None:
        return result
    check_buffer(op, name, buffer, result.shape, result.dtype, result.device)
    buffer.copy_(result)
    return buffer
