"""Argument checks shared by the public functions: one place, one message style.

Every check raises a typed kbit error that names the op, the argument and the bad value.
They run once, in the public API; backends receive arguments that already passed.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from .._errors import KbitTypeError, KbitValueError, QuantStateError
from .._formats import CODE_TABLE_SIZE, FLOAT_DTYPES, dtype_name


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


def _scalar_type_error(op: str, name: str, value: object, expected: str) -> KbitTypeError:
    return KbitTypeError(op, name, f"{value!r} (type {type(value).__name__})", expected)


def check_bias(op: str, bias: object, device: torch.device) -> torch.Tensor:
    """Require a floating-point bias on ``device`` (the input's); callers check its size."""
    bias = check_dtype(op, "bias", bias, FLOAT_DTYPES)
    if bias.device != device:
        raise KbitValueError(op, "bias.device", str(bias.device), f"expected A's device {device}")
    return bias


def check_int(op: str, name: str, value: object, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """Require a Python int (not a bool) in ``[low, high]`` (either bound may be open-ended).

    A non-int (``"64"``, ``64.0``, ``None``, ``True``) raises :class:`~kbit.KbitTypeError`;
    an int out of range raises :class:`~kbit.KbitValueError`. Without this check a wrong
    type reaches torch's op schema and surfaces as an untyped ``RuntimeError``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise _scalar_type_error(op, name, value, "an int")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"{'' if low is None else low}..{'' if high is None else high}"
        raise KbitValueError(op, name, value, f"expected an int in {span}")
    return value


def check_real(
    op: str,
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Require a finite real number in the interval from ``low`` to ``high``; returns a float.

    Ints, floats and one-element tensors pass (a bool does not: it is a flag, not a
    number). A wrong type raises :class:`~kbit.KbitTypeError`; NaN, infinities and values
    outside the interval raise :class:`~kbit.KbitValueError`.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise _scalar_type_error(op, name, value, "a real number")
        value = value.item()
    value = float(value)
    # Plain comparisons (NaN fails all of them) rather than math.isfinite, which
    # torch.compile cannot trace for a float it treats as symbolic.
    finite = -math.inf < value < math.inf
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not finite or below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise KbitValueError(op, name, value, f"expected a finite number in {interval}")
    return value


def check_choice(op: str, name: str, value: object, allowed: Sequence[object]) -> None:
    """Require ``value`` to be one of ``allowed``.

    When every allowed value is an int (blocksizes), a non-int is a type error first:
    ``blocksize="64"`` or ``True`` raises :class:`~kbit.KbitTypeError`, an unsupported int
    :class:`~kbit.KbitValueError`.
    """
    if allowed and all(isinstance(a, int) and not isinstance(a, bool) for a in allowed):
        check_int(op, name, value)
    if isinstance(value, bool) or value not in allowed:
        raise KbitValueError(op, name, value, f"expected one of {list(allowed)}")


def check_codes(op: str, name: str, codes: object, allowed: Sequence[torch.dtype]) -> torch.Tensor:
    """Require quantized codes (or packed data) of a dtype the format stores them as.

    Not a tensor is a type error; a tensor of another dtype is a malformed payload
    (:class:`~kbit.QuantStateError`): codes that cannot belong to any quantization state.
    """
    codes = check_tensor(op, name, codes)
    if codes.dtype not in allowed:
        raise QuantStateError(name, f"dtype {codes.dtype} cannot hold quantized codes (expected {_names(allowed)})", op=op)
    return codes


def check_payload_numel(op: str, name: str, tensor: torch.Tensor, expected: int, why: str) -> None:
    """Require a quantized payload (codes or scales) to hold as many elements as its state says."""
    if tensor.numel() != expected:
        raise QuantStateError(name, f"holds {tensor.numel()} values but {why} needs {expected}", op=op)


def check_numel(op: str, name: str, tensor: torch.Tensor, expected: int) -> None:
    """Require ``tensor`` to hold exactly ``expected`` elements."""
    if tensor.numel() != expected:
        raise KbitValueError(op, f"{name}.numel()", tensor.numel(), f"expected {expected}")


def check_code(op: str, code: object, *, inspect_values: bool = False, for_search: bool = False) -> torch.Tensor:
    """Require an 8-bit code table: 1-D float32 with one value per code (256 entries).

    Codes are bytes, so a shorter table would let a stored code index past its end. With
    ``inspect_values`` the values must also be finite and, when the table is searched for
    the nearest code (``for_search``: quantizing), sorted ascending. Reading values costs a
    device synchronisation, so callers inspect the tables a user passes in, not the ones of
    a state kbit built or its checkpoint reader already checked.
    """
    code = check_dtype(op, "code", code, (torch.float32,))
    if tuple(code.shape) != (CODE_TABLE_SIZE,):
        raise KbitValueError(
            op, "code.shape", tuple(code.shape), f"expected ({CODE_TABLE_SIZE},): one value per 8-bit code"
        )
    if inspect_values and code.device.type != "meta":
        if not bool(torch.isfinite(code).all()):
            bad = int((~torch.isfinite(code)).sum())
            raise KbitValueError(op, "code", f"a table with {bad} NaN/inf value(s)", "expected finite values")
        if for_search and not bool((code[1:] >= code[:-1]).all()):
            raise KbitValueError(
                op, "code", "an unsorted table", "expected values sorted ascending (the nearest-code search needs it)"
            )
    return code


def stored_values_problem(values: torch.Tensor, *, nonnegative: bool) -> Optional[str]:
    """What makes stored float ``values`` impossible (NaN/inf, or negative ones when
    ``nonnegative``), or None. One reduction, one synchronisation when nothing is wrong."""
    if values.device.type == "meta" or values.numel() == 0:
        return None
    finite = torch.isfinite(values)
    bad = ~finite | (values < 0) if nonnegative else ~finite
    if not bool(bad.any()):
        return None
    nonfinite = int((~finite).sum())
    if nonfinite:
        return f"holds {nonfinite} NaN/inf value(s) of {values.numel()}"
    return f"holds {int((values < 0).sum())} negative value(s) of {values.numel()}"


def check_stored_values(key: str, values: torch.Tensor, *, nonnegative: bool, meaning: str) -> None:
    """Refuse a checkpoint tensor whose values no valid save could hold.

    ``key`` names the entry, ``meaning`` says what the values are and so why they cannot be
    that (``"per-block scales: absolute maxima, finite and >= 0"``). Raises
    :class:`~kbit.QuantStateError`: such a tensor would load and then turn every output
    it touches into NaN, or flip signs, without any error.
    """
    problem = stored_values_problem(values, nonnegative=nonnegative)
    if problem:
        raise QuantStateError(key, f"{problem}; these are {meaning}")


def check_scales(key: str, scales: torch.Tensor) -> None:
    """:func:`check_stored_values` for quantization scales (absmax, ``SCB``, ``max1`` ...)."""
    check_stored_values(key, scales, nonnegative=True, meaning="quantization scales (absolute maxima: finite, >= 0)")


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
