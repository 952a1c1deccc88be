"""Fixed-width and paged variants (``Adam8bit``, ``PagedAdamW32bit``, ...) and positional-argument guards.

A variant is an ordinary class statement that names what it fixes as class keywords::

    class Adam8bit(Adam, optim_bits=8):
        '''Adam with 8-bit blockwise state.'''

:class:`~kbit.optim.Optimizer8bit` passes those keywords to :func:`install_variant`, which
gives the class an ``__init__`` with ``optim_bits`` / ``is_paged`` fixed.

Releases of bitsandbytes disagree on the positional order of the arguments after the
torch-style ones (some variants drop ``optim_bits``, later releases drop
``percentile_clipping`` and ``block_wise`` and put ``is_paged`` there), so a variant takes
only the torch-style arguments positionally and everything from ``optim_bits`` on by
keyword; the plain classes take up to ``min_8bit_size`` positionally. A call written for
any release either means the same thing or fails loudly with a ``TypeError`` that names the
keyword to use (:func:`guard_positional`), never binds a value to another argument.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

from .._errors import KbitValueError

__all__ = ["install_variant", "guard_positional"]

# The first of these in a plain optimizer's signature ends its torch-style arguments.
_OPTION_ARGUMENTS = ("optim_bits", "args", "min_8bit_size")


def _too_many(name: str, limit: int, given: int, keyword: str) -> TypeError:
    return TypeError(
        f"{name}() takes at most {limit} positional arguments ({given} given); "
        f"pass {keyword!r} and later arguments by keyword"
    )


def guard_positional(cls: type) -> None:
    """Make ``cls.__init__`` (defined in ``cls`` itself) name the keyword to use when given
    too many positional arguments, instead of Python's bare count."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "__kbit_guarded__", False):
        return
    parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword_only = [p.name for p in parameters if p.kind == p.KEYWORD_ONLY]
    if not keyword_only or any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return
    limit, name = len(positional), cls.__name__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > limit:
            raise _too_many(name, limit, len(args), keyword_only[0])
        init(self, *args, **kwargs)

    __init__.__kbit_guarded__ = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]


def _variant_signature(base: type, fixed: dict[str, Any]) -> tuple[inspect.Signature, int]:
    """The variant's ``__init__`` signature and how many arguments it takes positionally."""
    parameters = list(inspect.signature(base.__init__).parameters.values())
    cut = next(i for i, p in enumerate(parameters) if p.name in _OPTION_ARGUMENTS)
    head = parameters[:cut]
    tail = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=fixed.get(p.name, p.default))
        for p in parameters[cut:]
    ]
    return inspect.Signature(head + tail), cut - 1  # minus ``self``


def install_variant(cls: type, *, optim_bits: Optional[int] = None, is_paged: Optional[bool] = None) -> None:
    """Give the variant class ``cls`` an ``__init__`` with ``optim_bits`` / ``is_paged`` fixed.

    ``cls`` must not define ``__init__`` itself: the variant's constructor is its base's,
    with the fixed arguments filled in. Passing a fixed argument with another value raises
    instead of being ignored. The class docstring is completed with what it fixes.
    """
    if "__init__" in cls.__dict__:
        raise TypeError(f"{cls.__name__}: a variant fixing optim_bits/is_paged must not define __init__")
    base = cls.__mro__[1]
    name = cls.__name__
    fixed = {key: value for key, value in (("optim_bits", optim_bits), ("is_paged", is_paged)) if value is not None}
    signature, max_positional = _variant_signature(base, fixed)
    keyword = list(signature.parameters)[max_positional + 1]
    base_init: Callable[..., None] = base.__init__  # type: ignore[assignment]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > max_positional:
            raise _too_many(name, max_positional, len(args), keyword)
        for key, value in fixed.items():
            given = kwargs.get(key, value)
            if given != value or isinstance(given, bool) != isinstance(value, bool):
                raise KbitValueError(name, key, given, f"{name} always uses {key}={value!r}; use {base.__name__} to choose")
            kwargs[key] = value
        base_init(self, *args, **kwargs)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{name}.__init__"
    __init__.__kbit_guarded__ = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]
    summary = (cls.__doc__ or "").strip()
    doc = f"{summary}\n\nSame arguments as :class:`{base.__name__}`"
    if fixed:
        doc += " with " + " and ".join(f"``{k}={v!r}``" for k, v in fixed.items())
    cls.__doc__ = doc + f"; only the first {max_positional} may be passed positionally."
    if optim_bits is not None:
        cls._fixed_optim_bits = optim_bits  # type: ignore[attr-defined]
