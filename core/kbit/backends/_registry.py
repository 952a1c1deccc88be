"""Backend discovery, validation, ranking and selection.

The registry is the one place that decides which backend serves a call. It is built lazily
on first use (never at ``import kbit``):

1. discover entry points in the ``kbit.backends`` group and load each one's manifest
   (cheap by contract; a failure makes the record ``invalid``, never an exception);
2. build and probe a backend (``factory()`` then ``is_available()``) the first time it is a
   candidate for a call, once per process;
3. rank candidates for ``(op, device_type, dtype, params)``: an explicit request
   (``use_backend`` / ``backend=``) first, then ``KBIT_BACKEND``, then manifest priority;
4. cache the decision per (op, device type, dtype, params, preference, fallback policy).

When no candidate can serve a call, the reference backend (pure PyTorch, runs on any
device) takes it with one :class:`KbitFallbackWarning` per op, unless
``KBIT_FALLBACK=error``.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import importlib
import os
import threading
import warnings
from importlib import metadata
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from .._errors import (
    BackendNotFoundError,
    BackendUnavailableError,
    KbitFallbackWarning,
    KbitPluginWarning,
    KbitValueError,
    NoBackendError,
)
from .._formats import dtype_name
from .._manifest import CAPABILITY_PARAMS, BackendManifest
from .._opnames import ALL_OPS
from ..backend import Backend

ENTRY_POINT_GROUP = "kbit.backends"
REFERENCE = "reference"
FIRST_PARTY_DISTRIBUTION = "kbit"
FALLBACK_POLICIES = ("reference", "error")

#: What plugin code may raise that kbit contains. ``SystemExit`` is included because a
#: plugin that calls ``sys.exit()`` at import must not end the user's program;
#: ``KeyboardInterrupt`` is not, so Ctrl-C still works while a plugin loads.
PLUGIN_FAILURES = (Exception, SystemExit)

AVAILABLE = "available"
UNAVAILABLE = "unavailable"
INVALID = "invalid"
DISABLED = "disabled"
STATES = (AVAILABLE, UNAVAILABLE, INVALID, DISABLED)


@dataclasses.dataclass
class BackendRecord:
    """What the registry knows about one discovered backend.

    ``state`` is one of ``available``, ``unavailable``, ``invalid`` (the plugin is broken:
    its manifest failed to load or validate, or its factory raised) or ``disabled``
    (``KBIT_DISABLE_PLUGINS``); ``reason`` says why for every state but ``available``.
    """

    name: str
    distribution: Optional[str]
    version: Optional[str]
    entry_point: Optional[str]
    state: Optional[str] = None
    reason: Optional[str] = None
    manifest: Optional[BackendManifest] = None
    backend: Optional[Backend] = dataclasses.field(default=None, repr=False)

    @property
    def first_party(self) -> bool:
        """True for backends shipped in the ``kbit`` distribution itself."""
        return self.distribution == FIRST_PARTY_DISTRIBUTION

    @property
    def device_types(self) -> tuple[str, ...]:
        """Device types the manifest declares (empty when the manifest did not load)."""
        return self.manifest.device_types if self.manifest else ()

    @property
    def ops(self) -> tuple[str, ...]:
        """Op names the manifest declares, sorted."""
        return tuple(sorted(self.manifest.ops)) if self.manifest else ()

    @property
    def priority(self) -> int:
        """Manifest priority (higher wins when the user expressed no preference)."""
        return self.manifest.priority if self.manifest else 0


@dataclasses.dataclass(frozen=True)
class Resolution:
    """The outcome of choosing a backend for one kind of call.

    ``rejected`` holds ``(backend name, reason)`` for every candidate considered before
    (or instead of) the chosen one; ``fallback`` is True when the reference backend was
    taken because no candidate could serve the call.
    """

    op: str
    device_type: str
    dtype: Optional[str]
    params: tuple[tuple[str, Any], ...]
    name: str
    backend: Backend = dataclasses.field(repr=False)
    fallback: bool
    rejected: tuple[tuple[str, str], ...]

    def explain(self) -> str:
        """A human-readable account of the decision, one line per backend considered."""
        lines = [f"{self.op} on {self.device_type} ({self.dtype}): {self.name}"
                 + (" (fallback)" if self.fallback else "")]
        lines += [f"  not {name}: {why}" for name, why in self.rejected]
        return "\n".join(lines)


_preference: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "kbit_backend_preference", default=()
)

# A fallback policy set by ``use_backend(..., fallback=...)``; None defers to KBIT_FALLBACK.
_fallback_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "kbit_fallback_override", default=None
)


def _split_names(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _normalise_params(op: str, params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    unknown = sorted(set(params) - set(CAPABILITY_PARAMS))
    if unknown:
        raise KbitValueError(
            "resolve", unknown[0], params[unknown[0]], f"known parameters: {sorted(CAPABILITY_PARAMS)}"
        )
    normal = []
    for key, value in sorted(params.items()):
        if isinstance(value, torch.dtype):
            value = dtype_name(value)
        normal.append((key, value))
    return tuple(normal)


class Registry:
    """Process-wide backend registry (one instance, ``kbit.backends._registry.REGISTRY``)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._records: Optional[dict[str, BackendRecord]] = None
        self._cache: dict[tuple, Resolution] = {}
        self._warned_fallback: set[str] = set()
        self._warned_plugins: set[str] = set()

    # ------------------------------------------------------------------ discovery
    def reset(self) -> None:
        """Forget everything: discovery, probes, cached decisions, warnings given."""
        with self._lock:
            self._records = None
            self._cache.clear()
            self._warned_fallback.clear()
            self._warned_plugins.clear()

    def records(self) -> dict[str, BackendRecord]:
        """Every discovered backend by name, discovering on first call."""
        with self._lock:
            if self._records is None:
                self._records = self._discover()
            return self._records

    def _discover(self) -> dict[str, BackendRecord]:
        disabled = _split_names(os.environ.get("KBIT_DISABLE_PLUGINS"))
        records: dict[str, BackendRecord] = {}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            record = BackendRecord(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
                entry_point=ep.value,
            )
            if ep.name in records:
                other = records[ep.name]
                record.state = INVALID
                record.reason = (
                    f"duplicate backend name {ep.name!r}: already provided by "
                    f"{other.distribution or 'an unknown distribution'}"
                )
                self._warn_plugin(record)
                records[f"{ep.name}@{record.distribution}"] = record
                continue
            records[ep.name] = record
            if ep.name in disabled or ("all" in disabled and not record.first_party):
                record.state = DISABLED
                record.reason = "disabled by KBIT_DISABLE_PLUGINS"
                continue
            try:
                record.manifest = _as_manifest(ep.load())
                if record.manifest.name != ep.name:
                    raise ValueError(
                        f"entry point is named {ep.name!r} but its manifest says {record.manifest.name!r}"
                    )
            except PLUGIN_FAILURES as exc:  # a plugin may raise anything; none of it may escape
                record.manifest = None
                record.state = INVALID
                record.reason = f"manifest failed to load: {type(exc).__name__}: {exc}"
                self._warn_plugin(record)
        return records

    def register(self, manifest: BackendManifest | Mapping[str, Any], *, replace: bool = False) -> BackendRecord:
        """Add a backend at run time, as if an installed plugin had declared ``manifest``.

        Meant for tests and notebooks; installed plugins use the entry-point group. The
        registration lasts until :meth:`reset`.
        """
        manifest = _as_manifest(manifest)
        with self._lock:
            records = self.records()
            if manifest.name in records and not replace:
                raise KbitValueError(
                    "register", "manifest.name", manifest.name, "a backend of that name exists; pass replace=True"
                )
            record = BackendRecord(manifest.name, None, None, None, manifest=manifest)
            records[manifest.name] = record
            self._cache.clear()
            return record

    # -------------------------------------------------------------------- probing
    def probe(self, record: BackendRecord) -> BackendRecord:
        """Build and probe ``record``'s backend once; afterwards ``record.state`` is final."""
        with self._lock:
            if record.state is not None:
                return record
            assert record.manifest is not None
            try:
                factory = _import_object(record.manifest.factory)
                backend = factory()
                if not isinstance(backend, Backend):
                    raise TypeError(f"factory returned {type(backend).__name__}, not a kbit Backend")
                backend.manifest = record.manifest
            except PLUGIN_FAILURES as exc:
                record.state = INVALID
                record.reason = f"factory {record.manifest.factory!r} failed: {type(exc).__name__}: {exc}"
                self._warn_plugin(record)
                return record
            try:
                answer = backend.is_available()
            except PLUGIN_FAILURES as exc:
                record.state = UNAVAILABLE
                record.reason = f"is_available() raised {type(exc).__name__}: {exc}"
                self._warn_plugin(record)
                return record
            if answer is True:
                record.state, record.backend = AVAILABLE, backend
            else:
                record.state = UNAVAILABLE
                record.reason = answer if isinstance(answer, str) and answer else "is_available() returned False"
            return record

    def probe_all(self) -> list[BackendRecord]:
        """Probe every discovered backend and return all records."""
        with self._lock:
            records = list(self.records().values())
            for record in records:
                if record.state is None:
                    self.probe(record)
            return records

    def _warn_plugin(self, record: BackendRecord) -> None:
        key = f"{record.name}:{record.distribution}"
        if key in self._warned_plugins:
            return
        self._warned_plugins.add(key)
        source = f" from {record.distribution}" if record.distribution else ""
        warnings.warn(
            f"kbit: skipping backend {record.name!r}{source}: {record.reason}",
            KbitPluginWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ selection
    def get(self, name: str) -> Backend:
        """The usable backend called ``name``; raises when it is unknown or unusable."""
        return self._usable_or_raise(name).backend  # type: ignore[return-value]

    def _usable_or_raise(self, name: str) -> BackendRecord:
        records = self.records()
        record = records.get(name)
        if record is None:
            known = ", ".join(sorted(records)) or "none"
            raise BackendNotFoundError(f"no kbit backend named {name!r} is installed (known: {known})")
        if record.state is None:
            self.probe(record)
        if record.state != AVAILABLE:
            raise BackendUnavailableError(f"kbit backend {name!r} is {record.state}: {record.reason}")
        return record

    def preference(self) -> tuple[str, ...]:
        """The active preference: ``use_backend`` if inside one, else ``KBIT_BACKEND``."""
        return _preference.get() or _split_names(os.environ.get("KBIT_BACKEND"))

    def resolve(
        self,
        op: str,
        device_type: str,
        dtype: torch.dtype | str | None = None,
        *,
        warn: bool = False,
        **params: Any,
    ) -> Resolution:
        """Choose the backend for ``op`` on ``device_type``; see the module docstring."""
        if op not in ALL_OPS:
            raise KbitValueError("resolve", "op", op, f"known ops: {sorted(ALL_OPS)}")
        wanted_dtype = None if dtype is None else dtype_name(dtype)
        norm_params = _normalise_params(op, params)
        policy = _fallback_override.get() or os.environ.get("KBIT_FALLBACK", "reference").strip() or "reference"
        if policy not in FALLBACK_POLICIES:
            raise KbitValueError(op, "KBIT_FALLBACK", policy, f"expected one of {list(FALLBACK_POLICIES)}")
        preference = self.preference()
        key = (op, device_type, wanted_dtype, norm_params, preference, policy)
        resolution = self._cache.get(key)
        if resolution is None:
            with self._lock:
                resolution = self._cache.get(key) or self._choose(
                    op, device_type, wanted_dtype, norm_params, preference, policy
                )
                self._cache[key] = resolution
        if warn and resolution.fallback and op not in self._warned_fallback:
            self._warned_fallback.add(op)
            reasons = "; ".join(f"{n}: {why}" for n, why in resolution.rejected) or "no candidate"
            warnings.warn(
                f"kbit: {op} on {device_type} falls back to the reference backend ({reasons}). "
                "Set KBIT_FALLBACK=error to make this an error.",
                KbitFallbackWarning,
                stacklevel=3,
            )
        return resolution

    def _choose(
        self,
        op: str,
        device_type: str,
        dtype: Optional[str],
        params: tuple[tuple[str, Any], ...],
        preference: tuple[str, ...],
        policy: str,
    ) -> Resolution:
        records = self.records()
        for name in preference:
            record = records.get(name)
            # A named backend that cannot work is an error, never a silent fallback. An
            # unavailable one only matters for the device types it claims to serve.
            if record is None or record.state in (INVALID, DISABLED):
                self._usable_or_raise(name)
            if device_type in record.device_types:
                self.probe(record)
                if record.state != AVAILABLE:
                    self._usable_or_raise(name)

        serving = [r for r in records.values() if device_type in r.device_types and r.state not in (INVALID, DISABLED)]
        preferred = [records[n] for n in preference if records[n] in serving]
        if preferred:
            candidates = preferred
        else:
            candidates = sorted(serving, key=lambda r: (-r.priority, r.name != REFERENCE, r.name))

        rejected: list[tuple[str, str]] = []
        for record in candidates:
            why = self._refusal(record, op, dtype, params)
            if why is None:
                return Resolution(op, device_type, dtype, params, record.name, record.backend, False, tuple(rejected))  # type: ignore[arg-type]
            rejected.append((record.name, why))
        if not candidates:
            rejected.append(("*", f"no installed backend declares device type {device_type!r}"))

        reference = records.get(REFERENCE)
        tried_reference = any(record.name == REFERENCE for record in candidates)
        if policy == "reference" and reference is not None and not tried_reference:
            why = self._refusal(reference, op, dtype, params)
            if why is None:
                return Resolution(op, device_type, dtype, params, REFERENCE, reference.backend, True, tuple(rejected))  # type: ignore[arg-type]
            rejected.append((REFERENCE, why))
        elif policy == "error" and not tried_reference:
            rejected.append((REFERENCE, "not tried: KBIT_FALLBACK=error"))
        detail = f"no backend can serve {op} on {device_type}" + (f" with dtype {dtype}" if dtype else "")
        detail += "".join(f"{'; ' if i else ': '}{name}: {why}" for i, (name, why) in enumerate(rejected))
        raise NoBackendError(op, None, detail)

    def _refusal(
        self,
        record: BackendRecord,
        op: str,
        dtype: Optional[str],
        params: tuple[tuple[str, Any], ...],
    ) -> Optional[str]:
        if record.state in (INVALID, DISABLED):
            return f"{record.state}: {record.reason}"
        self.probe(record)
        if record.state != AVAILABLE:
            return f"{record.state}: {record.reason}"
        support = record.manifest.ops.get(op) if record.manifest else None
        if support is None:
            return f"does not declare {op}"
        return support.refusal(dtype, dict(params))


def _as_manifest(obj: Any) -> BackendManifest:
    if isinstance(obj, BackendManifest):
        return obj
    if isinstance(obj, Mapping):
        return BackendManifest.model_validate(dict(obj))
    raise TypeError(f"expected a kbit BackendManifest (or a mapping), got {type(obj).__name__}")


def _import_object(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


REGISTRY = Registry()


class use_backend:  # noqa: N801 - used like a function: ``with use_backend("cuda"):``
    """Context manager preferring the named backend(s) for calls made inside it.

    Accepts one name or an ordered list. Inside the block these backends are tried first,
    in order, for every device type they serve; an op none of them supports falls back (or
    is refused) per ``KBIT_FALLBACK``, or per ``fallback`` (``"reference"`` or ``"error"``)
    when given, for this block and this thread or task only. Naming a backend that is not
    installed, broken or disabled raises on the first call that would use it. Nests; the
    innermost wins.
    """

    def __init__(self, names: str | Sequence[str], *, fallback: Optional[str] = None) -> None:
        if isinstance(names, str):
            names = (names,)
        self.names = tuple(names)
        if not self.names or not all(isinstance(n, str) and n for n in self.names):
            raise KbitValueError("use_backend", "names", names, "one backend name or a non-empty list of names")
        if fallback is not None and fallback not in FALLBACK_POLICIES:
            raise KbitValueError("use_backend", "fallback", fallback, f"expected one of {list(FALLBACK_POLICIES)}")
        self.fallback = fallback
        self._tokens: Optional[tuple[contextvars.Token, contextvars.Token]] = None

    def __enter__(self) -> "use_backend":
        # Without ``fallback`` an enclosing block's override stays in force.
        self._tokens = (_preference.set(self.names), _fallback_override.set(self.fallback or _fallback_override.get()))
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._tokens is not None
        preference, fallback = self._tokens
        _fallback_override.reset(fallback)
        _preference.reset(preference)
        self._tokens = None


def iter_records() -> Iterator[BackendRecord]:
    """Every discovered backend, probed, in name order."""
    yield from sorted(REGISTRY.probe_all(), key=lambda r: r.name)



_active_logs: contextvars.ContextVar[tuple["CallLog", ...]] = contextvars.ContextVar("kbit_call_logs", default=())


class CallLog:
    """Counts of op calls by the backend that served them, filled inside :func:`record_calls`.

    ``counts`` maps ``(op, device_type, backend_name)`` to a number of calls.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def by_op(self) -> dict[str, dict[str, int]]:
        """``{op: {backend: calls}}``, ops sorted by name."""
        table: dict[str, dict[str, int]] = {}
        for (op, _device, backend), calls in sorted(self.counts.items()):
            table.setdefault(op, {}).setdefault(backend, 0)
            table[op][backend] += calls
        return table


@contextlib.contextmanager
def record_calls() -> Iterator[CallLog]:
    """Record which backend serves each kbit op call made inside the block.

    >>> with record_calls() as log:                                  # doctest: +SKIP
    ...     F.quantize_blockwise(torch.randn(100))
    >>> log.by_op()                                                  # doctest: +SKIP
    {'quantize_blockwise': {'reference': 1}}
    """
    log = CallLog()
    token = _active_logs.set(_active_logs.get() + (log,))
    try:
        yield log
    finally:
        _active_logs.reset(token)


def note_call(op: str, device_type: str, backend: str) -> None:
    """Count one call in every active :class:`CallLog` (cheap when none is active)."""
    for log in _active_logs.get():
        log.counts[(op, device_type, backend)] += 1
