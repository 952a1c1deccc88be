"""Typed errors and warnings raised by kbit.

Every error kbit raises on purpose derives from :class:`KbitError`, so callers can catch
the whole family at once, and each one also derives from the built-in exception a Python
user would expect (``ValueError`` for a bad argument, ``LookupError`` for an unknown
name), so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = [
    "KbitError",
    "KbitValueError",
    "KbitTypeError",
    "UnsupportedOpError",
    "BackendError",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "BackendResultError",
    "NoBackendError",
    "QuantStateError",
    "KbitWarning",
    "KbitPluginWarning",
    "KbitFallbackWarning",
    "KbitPagedMemoryWarning",
]


class KbitError(Exception):
    """Base class of every error kbit raises on purpose."""


class KbitValueError(KbitError, ValueError):
    """An argument has the right type but a value the op cannot accept.

    The message names the op, the argument and the offending value, e.g.
    ``quantize_blockwise: blocksize=100 is not supported (expected a power of two in 64..4096)``.
    Where that template reads badly (the value is a description, not a Python value),
    ``message`` replaces it; the attributes stay.
    """

    def __init__(self, op: str, argument: str, value: object, expected: str, *, message: str | None = None) -> None:
        self.op = op
        self.argument = argument
        self.value = value
        self.expected = expected
        super().__init__(message or f"{op}: {argument}={value!r} is not supported ({expected})")


class KbitTypeError(KbitError, TypeError):
    """An argument has the wrong type or dtype.

    The message names the op, the argument and what was given instead of what was expected.
    """

    def __init__(self, op: str, argument: str, value: object, expected: str) -> None:
        self.op = op
        self.argument = argument
        self.value = value
        self.expected = expected
        super().__init__(f"{op}: {argument} has {value} but {expected} is required")


class UnsupportedOpError(KbitError, NotImplementedError):
    """A backend was asked for an op (or an op variant) it does not implement.

    Refusing is part of the backend contract: a backend declares what it supports in its
    manifest and raises this for everything else.
    """

    def __init__(self, op: str, backend: str | None, detail: str = "") -> None:
        self.op = op
        self.backend = backend
        self.detail = detail
        if backend:
            message = f"{op}: backend {backend!r} does not support this call"
        else:
            message = f"{op}: no backend supports this call"
        super().__init__(f"{message}: {detail}" if detail else message)


class BackendError(KbitError):
    """Base class for problems with a backend as a whole (not with one call)."""


class BackendNotFoundError(BackendError, LookupError):
    """A backend was requested by a name no installed plugin provides."""


class BackendUnavailableError(BackendError, RuntimeError):
    """A backend exists but cannot be used here (broken plugin, missing device, disabled)."""


class BackendResultError(BackendError, RuntimeError):
    """A backend returned a result that breaks the contract (wrong shape, dtype or device).

    The core checks every result against the op's fake (meta) implementation before it
    reaches the caller, so a buggy plugin fails loudly at the call that went wrong instead
    of corrupting a ``QuantState`` or a model silently. The message names the op, the
    backend and the difference.
    """

    def __init__(self, op: str, backend: str, detail: str) -> None:
        self.op = op
        self.backend = backend
        self.detail = detail
        super().__init__(f"{op}: backend {backend!r} returned a result that breaks the contract: {detail}")


class NoBackendError(UnsupportedOpError):
    """No backend can serve a call; the message lists every candidate and why it was rejected."""


class QuantStateError(KbitError, ValueError):
    """A quantized payload is malformed: a serialized state, or codes that do not fit their state.

    Raised for state-dict entries (``key`` is the state-dict key) and, with ``op`` set, for
    arguments of a dequantize or 4-bit product whose codes or scales contradict the
    ``QuantState`` they come with (``key`` is the argument, e.g. ``A`` or
    ``quant_state.absmax``). The message names the op when given, the key and the problem.
    """

    def __init__(self, key: str, problem: str, *, op: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.op = op
        where = f"quant state key {key!r}" if op is None else f"{op}: {key}"
        super().__init__(f"{where}: {problem}")


class KbitWarning(UserWarning):
    """Base class of warnings emitted by kbit."""


class KbitPluginWarning(KbitWarning):
    """A backend plugin could not be loaded and was skipped."""


class KbitFallbackWarning(KbitWarning):
    """A call fell back to the reference backend because no preferred backend could serve it."""


class KbitPagedMemoryWarning(KbitWarning):
    """A paged optimizer runs with ordinary memory because its backend has no managed memory."""
