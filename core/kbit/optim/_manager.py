"""Per-parameter optimizer settings: the process-wide :class:`GlobalOptimManager`."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional

import torch

from .._errors import KbitTypeError, KbitValueError
from ._config import OVERRIDABLE

__all__ = ["GlobalOptimManager"]


def _check_override(where: str, config: object) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise KbitTypeError(where, "config", f"type {type(config).__name__}", "a dict of settings")
    unknown = sorted(set(config) - OVERRIDABLE)
    if unknown:
        raise KbitValueError(where, "config", unknown[0], f"settings that can be overridden: {sorted(OVERRIDABLE)}")
    return dict(config)


class GlobalOptimManager:
    """Process-wide registry of per-parameter optimizer settings (a singleton).

    Use it to give some parameters other settings than their optimizer's, most often 32-bit
    state for embeddings in an otherwise 8-bit optimizer::

        mng = GlobalOptimManager.get_instance()
        mng.register_parameters(model.parameters())     # optional: before moving the model
        mng.override_config(model.emb.weight, "optim_bits", 32)
        opt = kbit.optim.Adam8bit(model.parameters())

    Overrides are looked up every step, by parameter identity and, for parameters given to
    :meth:`register_parameters`, by their ``(group index, parameter index)`` position, so an
    override survives moving the model to another device when the parameters were
    registered first. Module overrides (:meth:`register_module_override`) follow the module's
    current parameter and hold no reference that keeps the module alive.
    """

    _instance: Optional["GlobalOptimManager"] = None
    # Versions never repeat, not even across initialize(): an optimizer compares the version
    # it resolved overrides at with the current one, and a counter restarted at 0 could
    # come back to the same number with other overrides registered.
    _versions = itertools.count(1)

    def __init__(self) -> None:
        raise RuntimeError("GlobalOptimManager is a singleton: call GlobalOptimManager.get_instance()")

    def initialize(self) -> None:
        """Forget every registered parameter and override."""
        #: Overrides by ``id(parameter)``; an entry goes when its parameter dies, so a
        #: new tensor that reuses the id does not inherit it.
        self.pid2config: dict[int, dict[str, Any]] = {}
        self._pid_refs: dict[int, weakref.ref] = {}
        #: Overrides by ``(group index, parameter index)``, from :meth:`register_parameters`.
        self.index2config: dict[tuple[int, int], dict[str, Any]] = {}
        self._module_overrides: list[tuple[weakref.ref, str, dict[str, Any]]] = []
        #: Changes whenever module overrides change, so optimizers re-resolve them.
        self.module_override_version = next(self._versions)

    @classmethod
    def get_instance(cls) -> "GlobalOptimManager":
        """The one manager of this process."""
        if cls._instance is None:
            instance = cls.__new__(cls)
            instance.initialize()
            cls._instance = instance
        return cls._instance

    def register_parameters(self, params: Iterable[Any]) -> None:
        """Remember the position of each parameter that already has an override.

        ``params`` is what you would give an optimizer (parameters or param-group dicts).
        Call it before replacing the parameters (e.g. moving the model to another device),
        then create the optimizer with the parameters in the same order.
        """
        groups = list(params)
        if groups and not isinstance(groups[0], Mapping):
            groups = [{"params": groups}]
        for group_index, group in enumerate(groups):
            for param_index, p in enumerate(group["params"]):
                if id(p) in self.pid2config:
                    self.index2config[(group_index, param_index)] = self.pid2config[id(p)]

    def override_config(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        key: Optional[str] = None,
        value: Any = None,
        key_value_dict: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Override settings for ``parameters``: one ``key``/``value`` or a ``key_value_dict``.

        Keys are optimizer settings (``optim_bits``, ``lr``, ``betas``, ``eps``,
        ``weight_decay``, ``min_8bit_size``, ``percentile_clipping``, ``block_wise``,
        ``max_unorm``, ``skip_zeros``, ``alpha``, ``t_alpha``, ``t_beta3``); values are
        checked by the optimizer when it uses them.
        """
        where = "GlobalOptimManager.override_config"
        if key is not None:
            if key_value_dict is not None:
                raise KbitValueError(where, "key_value_dict", "a dict", "either key/value or key_value_dict, not both")
            key_value_dict = {key: value}
        if key_value_dict is None:
            raise KbitValueError(where, "key", None, "a setting name and value, or key_value_dict")
        config = _check_override(where, key_value_dict)
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        for p in parameters:
            if not isinstance(p, torch.Tensor):
                raise KbitTypeError(where, "parameters", f"an element of type {type(p).__name__}", "tensors")
            self._track(p)
            self.pid2config.setdefault(id(p), {}).update(config)

    def _track(self, p: torch.Tensor) -> None:
        """Drop ``p``'s entry of :attr:`pid2config` when ``p`` is garbage collected."""
        pid = id(p)
        if pid in self._pid_refs:
            return
        refs, configs = self._pid_refs, self.pid2config  # this generation's, not initialize()'s next

        def forget(ref: weakref.ref) -> None:
            if refs.get(pid) is ref:
                del refs[pid]
                configs.pop(pid, None)

        refs[pid] = weakref.ref(p, forget)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: Mapping[str, Any]) -> None:
        """Override settings for ``getattr(module, param_name)``, whatever tensor it holds later."""
        where = "GlobalOptimManager.register_module_override"
        if not isinstance(module, torch.nn.Module):
            raise KbitTypeError(where, "module", f"type {type(module).__name__}", "a torch.nn.Module")
        config = _check_override(where, config)
        self._module_overrides = [entry for entry in self._module_overrides if entry[0]() is not None]
        self._module_overrides.append((weakref.ref(module), param_name, config))
        self.module_override_version = next(self._versions)

    @property
    def uses_config_override(self) -> bool:
        """Whether any override is registered (for a live parameter, position or module)."""
        return bool(self.pid2config or self.index2config or any(True for _ in self._live_module_overrides()))

    @property
    def module_weight_config_triple(self) -> list[tuple[torch.nn.Module, str, dict[str, Any]]]:
        """``(module, parameter name, settings)`` of every live module override."""
        return list(self._live_module_overrides())

    def _live_module_overrides(self) -> Iterator[tuple[torch.nn.Module, str, dict[str, Any]]]:
        for ref, name, config in self._module_overrides:
            module = ref()
            if module is not None:
                yield module, name, config

    def config_for(self, p: torch.Tensor, group_index: int, param_index: int) -> dict[str, Any]:
        """The overrides that apply to ``p`` at this position (empty when none)."""
        config: dict[str, Any] = {}
        config.update(self.index2config.get((group_index, param_index), {}))
        config.update(self.pid2config.get(id(p), {}))
        return config

    def module_overrides_for(self, params: Iterable[torch.Tensor]) -> dict[int, dict[str, Any]]:
        """Module overrides that target one of ``params``, by ``id`` of the parameter."""
        wanted = {id(p) for p in params}
        found: dict[int, dict[str, Any]] = {}
        for module, name, config in self._live_module_overrides():
            target = getattr(module, name, None)
            if isinstance(target, torch.Tensor) and id(target) in wanted:
                found.setdefault(id(target), {}).update(config)
        return found
