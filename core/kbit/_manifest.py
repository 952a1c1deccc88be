"""The backend manifest: what a backend declares about itself before it is imported.

A plugin's entry point in the ``kbit.backends`` group points at a :class:`BackendManifest`
object, not at the backend class. Loading the manifest must be cheap (no device probing, no
heavy imports), so the registry can list every installed backend, validate it and rank it
without paying for any of them. The backend itself is built later, from ``factory``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._opnames import ALL_OPS

__all__ = [
    "API_VERSION", "BackendManifest", "OpSupport", "DTYPE_NAMES", "CAPABILITY_PARAMS", "CAPABILITY_DEFAULTS",
    "ROUNDINGS", "is_backend_name",
]  # fmt: skip

#: Version of the backend contract (``Backend`` methods and their arguments) this core speaks.
#: A manifest built for another version is rejected as ``invalid`` instead of failing later.
#: Version 2: optimizer updates take one ``OptimizerStep``; ``quantize_blockwise`` takes
#: ``rand`` (stochastic rounding, declared with ``OpSupport.roundings``).
API_VERSION = 2

#: dtype names a manifest may declare, spelled as ``str(torch.float16).removeprefix("torch.")``.
DTYPE_NAMES = frozenset(
    {"float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64"}
)

#: Call parameters the registry matches against manifest fields, and the field each maps to.
CAPABILITY_PARAMS: Mapping[str, str] = {
    "blocksize": "blocksizes",
    "quant_type": "quant_types",
    "quant_storage": "quant_storages",
    "optimizer": "optimizers",
    "rounding": "roundings",
}

#: What an undeclared (``None``) capability field means when it is not "every value".
#: A capability added after version 1 must not be claimed by a manifest that never heard
#: of it: a manifest silent about ``roundings`` rounds to nearest only.
CAPABILITY_DEFAULTS: Mapping[str, tuple[str, ...]] = {"roundings": ("nearest",)}

#: Rounding modes of ``quantize_blockwise``: nearest code, or stochastic with ``rand``.
ROUNDINGS = ("nearest", "stochastic")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_backend_name(value: str) -> bool:
    """Whether ``value`` is spelled like a backend name (lowercase, digits, ``_``)."""
    return bool(_NAME.match(value))


class OpSupport(BaseModel):
    """Which variants of one op a backend implements.

    Each field lists the accepted values of one call parameter; ``None`` means the parameter
    does not restrict this op (it has no such parameter, or every value works), except for
    ``roundings``, where ``None`` means ``("nearest",)`` (see :data:`CAPABILITY_DEFAULTS`):
    a backend offering stochastic rounding says so with
    ``roundings=("nearest", "stochastic")``. The conformance suite tests every declared
    combination against the reference backend and expects ``UnsupportedOpError`` for every
    undeclared one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtypes: tuple[str, ...] | None = None
    blocksizes: tuple[int, ...] | None = None
    quant_types: tuple[str, ...] | None = None
    quant_storages: tuple[str, ...] | None = None
    optimizers: tuple[str, ...] | None = None
    roundings: tuple[str, ...] | None = None

    @field_validator("dtypes", "quant_storages")
    @classmethod
    def _known_dtypes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            unknown = sorted(set(value) - DTYPE_NAMES)
            if unknown:
                raise ValueError(f"unknown dtype name(s) {unknown}; use names like 'float16'")
        return value

    @field_validator("blocksizes")
    @classmethod
    def _positive_blocksizes(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and any(b <= 0 for b in value):
            raise ValueError(f"blocksizes must be positive, got {value}")
        return value

    @field_validator("roundings")
    @classmethod
    def _known_roundings(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and set(value) - set(ROUNDINGS):
            raise ValueError(f"unknown rounding mode(s) {sorted(set(value) - set(ROUNDINGS))}; known: {list(ROUNDINGS)}")
        return value

    def declared(self, field: str) -> tuple | None:
        """The values declared for capability ``field``; ``None`` when unrestricted."""
        value = getattr(self, field)
        return CAPABILITY_DEFAULTS.get(field) if value is None else value

    def refusal(self, dtype: str | None, params: Mapping[str, Any]) -> str | None:
        """Return why this op variant is not supported, or ``None`` when it is."""
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return f"dtype {dtype} not in declared {list(self.dtypes)}"
        for param, value in params.items():
            if value is None:
                continue
            declared = self.declared(CAPABILITY_PARAMS[param])
            if declared is not None and value not in declared:
                return f"{param}={value!r} not in declared {list(declared)}"
        return None


class BackendManifest(BaseModel):
    """Everything the registry needs to know about a backend without importing it.

    ``factory`` is a ``"package.module:Attribute"`` string; the attribute is called with no
    arguments to build the :class:`kbit.backend.Backend` instance the first time the backend
    is needed. ``priority`` ranks backends serving the same device type (higher wins) when the
    user expressed no preference. ``features`` names optional abilities beyond ops, such as
    ``"paged_memory"``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    api_version: int
    priority: int = 0
    device_types: tuple[str, ...] = Field(min_length=1)
    factory: str
    ops: Mapping[str, OpSupport]
    features: tuple[str, ...] = ()
    description: str = ""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"backend name {value!r} must match {_NAME.pattern}")
        return value

    @field_validator("factory")
    @classmethod
    def _valid_factory(cls, value: str) -> str:
        if not _FACTORY.match(value):
            raise ValueError(f"factory {value!r} must look like 'package.module:Attribute'")
        return value

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, value: Mapping[str, OpSupport]) -> Mapping[str, OpSupport]:
        unknown = sorted(set(value) - ALL_OPS)
        if unknown:
            raise ValueError(f"unknown op name(s) {unknown}; this kbit knows {sorted(ALL_OPS)}")
        return dict(value)

    @model_validator(mode="after")
    def _same_api(self) -> "BackendManifest":
        if self.api_version != API_VERSION:
            raise ValueError(
                f"built for kbit backend API version {self.api_version}, "
                f"but this kbit speaks version {API_VERSION}"
            )
        return self
