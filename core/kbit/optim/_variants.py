"""The fixed-width and paged variants of each optimizer (``Adam8bit``, ``PagedAdamW32bit``, ...).

Each variant is the plain optimizer with ``optim_bits`` and/or ``is_paged`` fixed. Releases
of bitsandbytes disagree on the positional order of the arguments after the torch-style
ones (some variants drop ``optim_bits``, later releases drop ``percentile_clipping`` and
``block_wise``), so a variant takes only the torch-style arguments positionally and
everything from ``optim_bits`` on by keyword: a call written for any release either means
the same thing or fails loudly, never binds a value to another argument.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

from .._errors import KbitValueError

__all__ = ["optimizer_variant"]

# The first of these in a plain optimizer's signature ends its torch-style arguments.
_OPTION_ARGUMENTS = ("optim_bits", "args", "min_8bit_size")


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


def optimizer_variant(base: type, name: str, *, optim_bits: Optional[int] = None, is_paged: Optional[bool] = None,
                      summary: str) -> type:  # fmt: skip
    """Subclass ``base`` as ``name`` with ``optim_bits`` / ``is_paged`` fixed.

    Passing a fixed argument with another value raises instead of being ignored.
    """
    fixed = {key: value for key, value in (("optim_bits", optim_bits), ("is_paged", is_paged)) if value is not None}
    signature, max_positional = _variant_signature(base, fixed)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > max_positional:
            keyword = list(signature.parameters)[max_positional + 1]
            raise TypeError(
                f"{name}() takes at most {max_positional} positional arguments ({len(args)} given); "
                f"pass {keyword!r} and later arguments by keyword"
            )
        for key, value in fixed.items():
            given = kwargs.get(key, value)
            if given != value or isinstance(given, bool) != isinstance(value, bool):
                raise KbitValueError(name, key, given, f"{name} always uses {key}={value!r}; use {base.__name__} to choose")
            kwargs[key] = value
        base.__init__(self, *args, **kwargs)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{name}.__init__"
    doc = f"{summary}\n\nSame arguments as :class:`{base.__name__}`"
    if fixed:
        doc += " with " + " and ".join(f"``{k}={v!r}``" for k, v in fixed.items())
    doc += f"; only the first {max_positional} may be passed positionally."
    namespace = {"__init__": __init__, "__doc__": doc, "__module__": base.__module__, "__qualname__": name}
    if optim_bits is not None:
        namespace["_fixed_optim_bits"] = optim_bits
    return type(name, (base,), namespace)
