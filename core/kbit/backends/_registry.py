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
import functools
import importlib
import os
import threading
import warnings
from importlib import metadata
from typing import Any, Iterator, Mapping, Optional, Sequence

import pydantic
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
from .._manifest import CAPABILITY_PARAMS, BackendManifest, is_backend_name
from .._opnames import ALL_OPS
from ..backend import Backend

ENTRY_POINT_GROUP = "kbit.backends"
REFERENCE = "reference"
FIRST_PARTY_DISTRIBUTION = "kbit"
FALLBACK_POLICIES = ("reference", "error")

#: The environment variables the registry reads.
BACKEND_VAR = "KBIT_BACKEND"
DISABLE_VAR = "KBIT_DISABLE_PLUGINS"
FALLBACK_VAR = "KBIT_FALLBACK"
#: The ``KBIT_DISABLE_PLUGINS`` entry meaning every backend not shipped with kbit.
DISABLE_ALL = "all"
#: What each variable accepts: the one definition error messages, ``kbit info`` and
#: docs/configuration.md repeat.
SETTINGS: dict[str, str] = {
    BACKEND_VAR: "backend names separated by commas, the most preferred first",
    DISABLE_VAR: f"backend names separated by commas, or {DISABLE_ALL!r} (every backend not shipped with kbit)",
    FALLBACK_VAR: " or ".join(repr(policy) for policy in FALLBACK_POLICIES),
}

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


#: Values that read as an on/off switch. ``KBIT_DISABLE_PLUGINS=true`` means "disable
#: plugins", not "disable the backend called true", so they are refused there.
_SWITCH_WORDS = frozenset({"0", "1", "true", "false", "yes", "no", "on", "off"})


@functools.lru_cache(maxsize=64)
def _parse_names(variable: str, raw: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(names, invalid entries)`` of a comma-separated backend list (cached: read per call)."""
    names: list[str] = []
    invalid: list[str] = []
    for part in raw.split(","):
        entry = part.strip()
        if not entry:
            continue
        if variable == DISABLE_VAR:
            valid = entry == DISABLE_ALL or (is_backend_name(entry) and entry.lower() not in _SWITCH_WORDS)
        else:
            valid = is_backend_name(entry)
        (names if valid else invalid).append(entry)
    return tuple(names), tuple(invalid)


def _entry_problem(variable: str, entry: str) -> str:
    if variable == DISABLE_VAR and entry.lower() in _SWITCH_WORDS:
        return f"{entry!r} is a switch, not a backend name (use {DISABLE_ALL!r} to disable every plugin)"
    return f"{entry!r} is not a backend name"


def _not_a_name(variable: str, raw: str, entry: str, op: str) -> KbitValueError:
    return KbitValueError(op, variable, raw, f"expected {SETTINGS[variable]}; {_entry_problem(variable, entry)}")


def setting_names(variable: str, op: str = "kbit") -> tuple[str, ...]:
    """The backend names listed in environment variable ``variable`` (``KBIT_BACKEND`` or
    ``KBIT_DISABLE_PLUGINS``); raises :class:`~kbit.KbitValueError` naming ``op`` for an entry
    that cannot be one (``KBIT_DISABLE_PLUGINS=1`` is not taken as a backend called "1")."""
    raw = os.environ.get(variable, "")
    names, invalid = _parse_names(variable, raw)
    if invalid:
        raise _not_a_name(variable, raw, invalid[0], op)
    return names


def fallback_policy(op: str = "kbit") -> str:
    """The fallback policy in force: ``use_backend(fallback=...)``, else ``KBIT_FALLBACK``
    (default ``reference``); raises :class:`~kbit.KbitValueError` naming ``op`` for another value."""
    override = _fallback_override.get()
    if override is not None:
        return override
    policy = os.environ.get(FALLBACK_VAR, "").strip() or FALLBACK_POLICIES[0]
    if policy not in FALLBACK_POLICIES:
        raise KbitValueError(op, FALLBACK_VAR, policy, f"expected {SETTINGS[FALLBACK_VAR]}")
    return policy


@dataclasses.dataclass(frozen=True)
class SettingProblem:
    """An environment setting that is invalid or matches nothing (``kbit info`` lists them).

    ``fatal`` ones make kbit calls fail while they stand; the others only have no effect.
    """

    variable: str
    value: str
    problem: str
    fatal: bool


def describe_failure(exc: BaseException) -> str:
    """``Type: message`` on one line; a manifest's validation errors as ``field: problem; ...``."""
    if isinstance(exc, pydantic.ValidationError):
        detail = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'manifest'}: {error['msg']}" for error in exc.errors()
        )
    else:
        detail = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {detail}"


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
        self._disable_setting = ""  # KBIT_DISABLE_PLUGINS as the last discovery read it
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
        # Entries that are not names disable nothing; calls refuse to run while they stand
        # (see _settings_error), but discovery goes on so `kbit info` can show them.
        self._disable_setting = os.environ.get(DISABLE_VAR, "")
        disabled, _ = _parse_names(DISABLE_VAR, self._disable_setting)
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
            if ep.name in disabled or (DISABLE_ALL in disabled and not record.first_party):
                record.state = DISABLED
                record.reason = f"disabled by {DISABLE_VAR}"
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
                record.reason = f"manifest failed to load: {describe_failure(exc)}"
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
                record.reason = f"factory {record.manifest.factory!r} failed: {describe_failure(exc)}"
                self._warn_plugin(record)
                return record
            try:
                answer = backend.is_available()
            except PLUGIN_FAILURES as exc:
                record.state = UNAVAILABLE
                record.reason = f"is_available() raised {describe_failure(exc)}"
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
        error = self._settings_error("kbit.backends.get")
        if error is not None:
            raise error
        record = records.get(name)
        if record is None:
            known = ", ".join(sorted(records)) or "none"
            raise BackendNotFoundError(f"no kbit backend named {name!r} is installed (known: {known})")
        if record.state is None:
            self.probe(record)
        if record.state != AVAILABLE:
            raise BackendUnavailableError(f"kbit backend {name!r} is {record.state}: {record.reason}")
        return record

    def preference(self, op: str = "kbit") -> tuple[str, ...]:
        """The active preference: ``use_backend`` if inside one, else ``KBIT_BACKEND``."""
        return _preference.get() or setting_names(BACKEND_VAR, op)

    def setting_problems(self) -> list[SettingProblem]:
        """Every ``KBIT_*`` setting that is invalid or matches no discovered backend."""
        records = self.records()
        installed = ", ".join(sorted(records)) or "none"
        problems: list[SettingProblem] = []

        # KBIT_DISABLE_PLUGINS as discovery read it: that is the value in effect.
        values = {BACKEND_VAR: os.environ.get(BACKEND_VAR, ""), DISABLE_VAR: self._disable_setting,
                  FALLBACK_VAR: os.environ.get(FALLBACK_VAR, "")}  # fmt: skip

        def flag(variable: str, problem: str, fatal: bool) -> None:
            problems.append(SettingProblem(variable, values[variable], problem, fatal))

        for variable in (BACKEND_VAR, DISABLE_VAR):
            names, invalid = _parse_names(variable, values[variable])
            for entry in invalid:
                flag(variable, f"{_entry_problem(variable, entry)} (expected {SETTINGS[variable]})", True)
            for name in names:
                record = records.get(name)
                if record is None and name != DISABLE_ALL:
                    effect = "calls fail" if variable == BACKEND_VAR else "nothing to disable"
                    flag(variable, f"{name!r} matches no installed backend ({effect}; installed: {installed})",
                         variable == BACKEND_VAR)  # fmt: skip
                elif variable == BACKEND_VAR and record.state in (INVALID, DISABLED):
                    flag(variable, f"{name!r} is {record.state}: {record.reason} (calls fail)", True)
        try:
            fallback_policy()
        except KbitValueError as exc:
            flag(FALLBACK_VAR, exc.expected, True)
        return problems

    def _settings_error(self, op: str) -> Optional[KbitValueError]:
        """The error every call gets while ``KBIT_DISABLE_PLUGINS`` (as discovery read it)
        holds an entry that is not a name: the user meant to disable something, and it is not."""
        self.records()
        _, invalid = _parse_names(DISABLE_VAR, self._disable_setting)
        return _not_a_name(DISABLE_VAR, self._disable_setting, invalid[0], op) if invalid else None

    def fallback_backend(self) -> Optional[str]:
        """The backend that serves calls no other backend can under the current policy:
        the reference for ``KBIT_FALLBACK=reference`` (the default), None otherwise."""
        try:
            policy = fallback_policy()
        except KbitValueError:
            return None
        return REFERENCE if policy == "reference" and REFERENCE in self.records() else None

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
        policy = fallback_policy(op)
        preference = self.preference(op)
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
        error = self._settings_error(op)
        if error is not None:
            raise error
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
