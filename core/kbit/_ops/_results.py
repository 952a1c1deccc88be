"""What each op returns, written once: the fake (meta) kernel and the backend result check.

Every custom op describes its outputs with a function returning :class:`Out` specs (shape,
dtype, device) from the op's arguments. The same function builds the op's fake kernel
(:func:`fake_from`), which ``torch.compile`` uses to know output shapes, and checks what a
backend actually returned (:func:`checked`) before it reaches the caller. So a plugin that
returns codes of the wrong shape, or float64 where float32 was asked for, fails at the
call with :class:`~kbit._errors.BackendResultError` naming the backend, the op and the
difference, instead of corrupting a ``QuantState`` that fails much later.

The check is cheap by design (a handful of attribute reads per output; see
``benchmarks/bench_dispatch.py``): it runs on every call.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch

from .._errors import BackendResultError
from ..backend import Backend

__all__ = ["Out", "UpTo", "Spec", "fake_from", "checked"]


class UpTo(NamedTuple):
    """A data-dependent length in an output shape: anything from 0 to ``bound`` (None: unbounded)."""

    bound: Optional[int]


class Out:
    """One expected output tensor: its name (for messages), shape (ints, or :class:`UpTo`
    for a data-dependent length), dtype and device.

    A plain slotted class rather than a NamedTuple: specs are built on every call, and this
    is the cheapest object Python builds.
    """

    __slots__ = ("name", "shape", "dtype", "device")

    def __init__(self, name: str, shape: Sequence[Any], dtype: torch.dtype, device: torch.device) -> None:
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.device = device

    def __repr__(self) -> str:
        return f"Out({self.name!r}, {tuple(self.shape)}, {self.dtype}, {self.device})"


#: What a spec function returns: one output, a tuple of outputs, or None (an in-place op).
Spec = Union[Out, tuple[Out, ...], None]


def _fake_tensor(out: Out) -> torch.Tensor:
    shape = []
    for size in out.shape:
        if isinstance(size, UpTo):
            size = torch.library.get_ctx().new_dynamic_size(min=0, max=size.bound)
        shape.append(size)
    return torch.empty(shape, dtype=out.dtype, device=out.device)


def fake_from(spec: Callable[..., Spec]) -> Callable[..., Any]:
    """The fake kernel of an op whose outputs ``spec`` describes (register it with ``register_fake``)."""

    def fake(*args: Any, **kwargs: Any) -> Any:
        expected = spec(*args, **kwargs)
        if expected is None:
            return None
        if isinstance(expected, Out):
            return _fake_tensor(expected)
        return tuple(_fake_tensor(out) for out in expected)

    fake.__doc__ = f"Fake kernel built from {spec.__name__}."
    return fake


def _shape_matches(shape: torch.Size, wanted: Sequence[Any]) -> bool:
    # Fast path: a static shape compares equal to the spec's tuple of ints.
    if shape == wanted:
        return True
    if len(shape) != len(wanted):
        return False
    for size, want in zip(shape, wanted):
        if isinstance(want, UpTo):
            if size < 0 or (want.bound is not None and size > want.bound):
                return False
        elif size != want:
            return False
    return True


def _difference(got: object, out: Out) -> Optional[str]:
    """How ``got`` differs from ``out``, or None when it matches."""
    if isinstance(got, torch.Tensor) and got.shape == out.shape and got.dtype == out.dtype and got.device == out.device:
        return None  # the common case, in as few attribute reads as possible
    if not isinstance(got, torch.Tensor):
        return f"{out.name} is {type(got).__name__}, expected a tensor"
    if not _shape_matches(got.shape, out.shape):
        wanted = tuple(f"<={w.bound}" if isinstance(w, UpTo) else w for w in out.shape)
        return f"{out.name} has shape {tuple(got.shape)}, expected {wanted}"
    if got.dtype != out.dtype:
        return f"{out.name} has dtype {got.dtype}, expected {out.dtype}"
    if got.device != out.device:
        return f"{out.name} is on {got.device}, expected {out.device}"
    return None


def checked(op: str, backend: Backend, result: Any, expected: Spec) -> Any:
    """Return ``result`` if it has the outputs ``expected`` describes; raise otherwise.

    Raises :class:`~kbit._errors.BackendResultError` naming ``backend``, ``op`` and the
    first difference found.
    """
    if isinstance(expected, Out):
        problem = _difference(result, expected)
    elif expected is None:
        problem = None if result is None else f"returned {type(result).__name__}, expected None (the op works in place)"
    elif not isinstance(result, (tuple, list)) or len(result) != len(expected):
        count = len(result) if isinstance(result, (tuple, list)) else type(result).__name__
        names = ", ".join(out.name for out in expected)
        problem = f"returned {count} result(s), expected a tuple of {len(expected)} ({names})"
    else:
        problem = None
        for got, out in zip(result, expected):
            problem = _difference(got, out)
            if problem:
                break
        result = tuple(result)
    if problem:
        raise BackendResultError(op, backend.name, problem)
    return result
