"""The optimizer machinery shared by every kbit optimizer.

:class:`Optimizer8bit` is a ``torch.optim.Optimizer`` that keeps, per parameter, 32-bit or
8-bit state (blockwise or whole-tensor) and updates it with the fused kernels of
:mod:`kbit.functional`. :class:`Optimizer1State` and :class:`Optimizer2State` are the
bitsandbytes-compatible bases the concrete optimizers (``Adam``, ``Lion``, ...) derive from.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch

from .._errors import KbitTypeError, KbitValueError
from .._formats import GNORM_HISTORY, OPTIMIZER_BLOCKSIZE, num_blocks
from ..functional import _optim as F
from .._optim_step import OptimizerKind, layout_of
from ..functional._codebooks import cached_code
from ._checkpoint import (
    STATE_CODES,
    check_state_layout,
    checked_param_state,
    flat_param_state,
    nest_quant_state,
    state_layout,
)
from ._config import (
    HYPERPARAMETERS,
    check_group_hyperparameters,
    check_layout_options,
    check_state_options,
    state_options,
)
from ._manager import GlobalOptimManager
from ._paging import PagedAllocator
from ._variants import guard_positional, install_variant

__all__ = ["Optimizer8bit", "Optimizer1State", "Optimizer2State", "ademamix_schedule"]


def ademamix_schedule(step: int, beta1: float, beta3: float, alpha: float,
                      t_alpha: Optional[int], t_beta3: Optional[int]) -> tuple[float, float]:  # fmt: skip
    """AdEMAMix's warm-up of ``alpha`` and ``beta3`` at ``step`` (``None`` periods: constant).

    ``alpha_t = min(t * alpha / t_alpha, alpha)``;
    ``beta3_t = min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3)`` with
    ``T = t_beta3``: it rises from ``beta1`` to ``beta3`` over ``T`` steps.
    """
    alpha_t = alpha if t_alpha is None else min(step * alpha / t_alpha, alpha)
    if t_beta3 is None or beta1 <= 0.0 or beta3 <= 0.0:
        return beta3, alpha_t
    ln1, ln3 = math.log(beta1), math.log(beta3)
    fraction = step / t_beta3
    beta3_t = min(math.exp(ln1 * ln3 / ((1.0 - fraction) * ln3 + fraction * ln1)), beta3)
    return beta3_t, alpha_t


#: Parameter dtypes the update ops take (the state is float32 or uint8 whatever the dtype).
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Largest gradient magnitude the optimizers take: its square (second moments, norms) is
#: still finite in float32. An inf second moment would make an 8-bit block's scale inf and
#: the next step would write NaN into every parameter of that block.
_MAX_GRAD = math.sqrt(torch.finfo(torch.float32).max)

#: ``name2qmap`` keys (bitsandbytes' names) and the shared code tables they stand for.
_QMAP_CODES = {"dynamic": "dynamic", "udynamic": "dynamic_unsigned"}


class Optimizer8bit(torch.optim.Optimizer):
    """Base class of kbit's optimizers: per-parameter 32-bit or 8-bit state.

    Subclasses set :attr:`kind` (an entry of :data:`kbit.backend.OPTIMIZER_KINDS`)
    through :class:`Optimizer1State` / :class:`Optimizer2State`. What this class adds to
    ``torch.optim.Optimizer``:

    - per-parameter settings from :class:`GlobalOptimManager` (e.g. 32-bit state for one
      embedding in an 8-bit optimizer);
    - a step that checks all gradients first and changes nothing when one is sparse or
      holds NaN/inf (a typed error says which parameter); see ``docs/optimizers.md``;
    - checkpoints in the bitsandbytes layout (quantization tensors nested under
      ``"__bnb_optimizer_quant_state__"``), loaded without casting and validated.
    """

    #: The optimizer kind; set by the concrete classes.
    kind: Optional[OptimizerKind] = None
    #: State width a class fixes (``Adam8bit``: 8); ``None`` lets ``optim_bits`` choose.
    _fixed_optim_bits: Optional[int] = None

    def __init_subclass__(cls, *, optim_bits: Optional[int] = None, is_paged: Optional[bool] = None,
                          **kwargs: Any) -> None:  # fmt: skip
        """``class Adam8bit(Adam, optim_bits=8)`` declares a variant with ``optim_bits`` (and/or
        ``is_paged``) fixed; every subclass's own ``__init__`` names the keyword to use
        when given too many positional arguments (see :mod:`kbit.optim._variants`)."""
        super().__init_subclass__(**kwargs)
        if optim_bits is not None or is_paged is not None:
            install_variant(cls, optim_bits=optim_bits, is_paged=is_paged)
        else:
            guard_positional(cls)

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], optim_bits: int = 32,
                 is_paged: bool = False) -> None:  # fmt: skip
        self.initialized = False
        self.is_paged = bool(is_paged)
        self.mng = GlobalOptimManager.get_instance()
        self._optim_bits = optim_bits  # only for subclasses without ``args``; see optim_bits
        self._module_overrides: dict[int, dict[str, Any]] = {}
        self._module_override_version = -1
        self._allocator: Optional[PagedAllocator] = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ settings
    @property
    def _owner(self) -> str:
        return type(self).__name__

    @property
    def optim_bits(self) -> int:
        """The state width new states get (``args.optim_bits``, read at every step)."""
        args = getattr(self, "args", None)
        return args.optim_bits if args is not None else self._optim_bits

    @property
    def optimizer_name(self) -> Optional[str]:
        """The name of :attr:`kind` (``"adam"``, ``"lion"``, ...)."""
        return None if self.kind is None else self.kind.name

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyperparameters are validated like the constructor's."""
        if self.kind is not None:
            param_group = dict(param_group)
            param_group.update(check_group_hyperparameters(self._owner, self.kind, param_group))
        super().add_param_group(param_group)

    def check_overrides(self) -> None:
        """Resolve module overrides (``register_module_override``) to this optimizer's parameters."""
        params = [p for group in self.param_groups for p in group["params"]]
        self._module_overrides = self.mng.module_overrides_for(params)
        self._module_override_version = self.mng.module_override_version

    def get_config(self, gindex: int, pindex: int, group: dict[str, Any]) -> dict[str, Any]:
        """The settings that apply to parameter ``pindex`` of group ``gindex``, validated.

        Validated on every call, not only at construction: schedulers and users edit
        ``param_groups`` and ``args`` in place, and overrides may be registered at any time.
        """
        config = {key: group[key] for key in HYPERPARAMETERS if key in group}
        config.update(vars(self.args))
        p = group["params"][pindex]
        override = dict(self._module_overrides.get(id(p), {}))
        override.update(self.mng.config_for(p, gindex, pindex))
        owner = f"{self._owner} (parameter {pindex} of group {gindex})"
        if override:
            owner = f"{self._owner} (override for parameter {pindex} of group {gindex})"
            config.update(override)
        check_state_options(owner, config)
        config.update(check_group_hyperparameters(owner, self.kind, config))
        return config

    @staticmethod
    def _new_layout(config: dict[str, Any], p: torch.Tensor) -> tuple[bool, bool]:
        """``(eight_bit, block_wise)`` of the state ``config`` allocates for ``p``.

        An empty parameter keeps (empty) 32-bit state whatever ``min_8bit_size`` says: it
        has no block to scale.
        """
        eight_bit = config["optim_bits"] == 8 and p.numel() >= max(config["min_8bit_size"], 1)
        return eight_bit, bool(config["block_wise"])

    def _layout(self, config: dict[str, Any], p: torch.Tensor) -> tuple[bool, bool]:
        """``(eight_bit, block_wise)`` of ``p``'s state: as allocated, or as ``config`` will allocate it."""
        state = self.state.get(p)  # .get: the defaultdict must not grow an empty entry
        return state_layout(state) if state else self._new_layout(config, p)

    def _checked_config(self, gindex: int, pindex: int, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """:meth:`get_config` plus the layout checks the update of ``p`` will make."""
        config = self.get_config(gindex, pindex, group)
        eight_bit, block_wise = self._layout(config, p)
        owner = f"{self._owner} (parameter {pindex} of group {gindex})"
        check_layout_options(owner, self.kind, config, eight_bit=eight_bit, block_wise=block_wise)
        return config

    # ---------------------------------------------------------------------- step
    @property
    def name2qmap(self) -> Mapping[str, torch.Tensor]:
        """The 8-bit state code tables (CPU copies), read-only: ``"dynamic"`` (signed, first
        moments and single states) and ``"udynamic"`` (unsigned, second moments).

        A view on the process-wide tables of :func:`kbit.functional._codebooks.cached_code`,
        which every optimizer's states share (per device); never modify them in place.
        """
        return types.MappingProxyType({name: cached_code(code) for name, code in _QMAP_CODES.items()})

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype, p: torch.Tensor, op: str) -> torch.Tensor:
        if self._allocator is not None:
            return self._allocator.zeros(shape, dtype, p, op)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def init_state(self, group: dict[str, Any], p: torch.Tensor, gindex: int, pindex: int,
                   config: Optional[dict[str, Any]] = None) -> None:  # fmt: skip
        """Allocate the state of ``p`` (8-bit when enabled and ``p`` has ``min_8bit_size`` elements).

        ``config`` is the already checked result of :meth:`_checked_config` (``step`` passes
        it); without it the settings are looked up and checked here.
        """
        self._require_kind()
        checked = config is not None
        if config is None:
            config = self.get_config(gindex, pindex, group)
        eight_bit, block_wise = self._new_layout(config, p)
        if not checked:
            check_layout_options(self._owner, self.kind, config, eight_bit=eight_bit, block_wise=block_wise)
        stacked = (2,) if self.kind.stacked_state1 else ()
        shapes = [stacked + tuple(p.shape), tuple(p.shape)][: self.kind.num_states]
        state = self.state[p]
        state["step"] = 0
        for which, shape in enumerate(shapes, start=1):
            dtype = torch.uint8 if eight_bit else torch.float32
            state[f"state{which}"] = self._zeros(shape, dtype, p, layout_of(eight_bit, block_wise).op)
            if not eight_bit:
                continue
            state[f"qmap{which}"] = cached_code(STATE_CODES[which], p.device)
            if block_wise:
                nblocks = num_blocks(p.numel(), OPTIMIZER_BLOCKSIZE)
                rows = stacked if which == 1 else ()
                state[f"absmax{which}"] = torch.zeros(rows + (nblocks,), dtype=torch.float32, device=p.device)
            else:
                state[f"max{which}"] = torch.zeros(1, dtype=torch.float32, device=p.device)
                state[f"new_max{which}"] = torch.zeros(1, dtype=torch.float32, device=p.device)
        if config["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros(GNORM_HISTORY, dtype=torch.float32, device=p.device)
        if config["max_unorm"] > 0:
            state["unorm_vec"] = torch.zeros(1, dtype=torch.float32, device=p.device)

    def _check_gradients(self, work: list[tuple[int, int, dict, torch.Tensor]]) -> None:
        """Refuse sparse and non-finite gradients (and those whose square overflows float32),
        and dtypes the update ops do not take, before any state changes.

        One reduction per gradient (its min and max: NaN and inf survive both) and one
        host synchronisation per device for the whole step.
        """
        extremes: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for gindex, pindex, _, p in work:
            if p.device.type == "meta":
                where, name = f"{self._owner}.step", f"parameter {pindex} of group {gindex}"
                raise KbitValueError(
                    where, name, "a meta tensor", "a parameter with values",
                    message=f"{where}: {name} is on the meta device, which holds shapes but no values to update; "
                    "materialize the model first (to_empty() or load_state_dict(..., assign=True))",
                )  # fmt: skip
            if p.grad.is_sparse:
                raise KbitTypeError(
                    f"{self._owner}.step", f"grad of parameter {pindex} in group {gindex}", "a sparse layout",
                    "a dense gradient (kbit optimizers do not take sparse gradients; use sparse=False)",
                )  # fmt: skip
            # The ops would refuse these too, but only when this parameter's turn comes,
            # after the earlier ones were already stepped.
            if p.dtype not in _PARAM_DTYPES:
                raise KbitTypeError(
                    f"{self._owner}.step", f"parameter {pindex} in group {gindex}", f"dtype {p.dtype}",
                    "float32, float16 or bfloat16",
                )  # fmt: skip
            if p.grad.dtype != p.dtype:
                raise KbitTypeError(
                    f"{self._owner}.step", f"grad of parameter {pindex} in group {gindex}", f"dtype {p.grad.dtype}",
                    f"the parameter's dtype {p.dtype}",
                )  # fmt: skip
            if p.grad.numel():
                extremes[p.grad.device].append(torch.stack(torch.aminmax(p.grad)).float())
        # NaN fails the comparison, so one test covers NaN, inf and squares that overflow.
        if all(bool((torch.cat(values).abs() <= _MAX_GRAD).all()) for values in extremes.values()):
            return
        for gindex, pindex, _, p in work:
            if not p.grad.numel():
                continue
            bad = int((~torch.isfinite(p.grad)).sum())
            what = "are NaN or infinite"
            if not bad:
                bad = int((p.grad.float().abs() > _MAX_GRAD).sum())
                what = f"exceed {_MAX_GRAD:.3g} in magnitude, so their squares overflow float32"
            if bad:
                where, name = f"{self._owner}.step", f"parameter {pindex} of group {gindex}"
                raise KbitValueError(
                    where, f"grad of {name}", f"{bad} of {p.grad.numel()} values {what}", "finite gradients",
                    message=f"{where}: {name}: {bad} of its {p.grad.numel()} gradient values {what}. Nothing was "
                    "updated, so it is safe to skip this batch (zero_grad()) and step again; if it keeps "
                    "happening, lower the learning rate or use loss scaling",
                )  # fmt: skip

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``).

        All gradients are checked first; a sparse or non-finite gradient, or a dtype the
        update ops do not take, raises and leaves every parameter and state unchanged.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized or self._module_override_version != self.mng.module_override_version:
            self.check_overrides()
            self.initialized = True
        work = [
            (gindex, pindex, group, p)
            for gindex, group in enumerate(self.param_groups)
            for pindex, p in enumerate(group["params"])
            if p.grad is not None
        ]
        self._require_kind()
        self._check_gradients(work)
        # Every parameter's settings are checked before the first one is updated, so a bad
        # setting in a later group cannot leave the earlier groups already stepped.
        configs = [self._checked_config(gindex, pindex, group, p) for gindex, pindex, group, p in work]
        for (gindex, pindex, group, p), config in zip(work, configs, strict=True):
            if not self.state.get(p):
                self.init_state(group, p, gindex, pindex, config=config)
            self.update_step(group, p, gindex, pindex, config=config)
        return loss

    def _require_kind(self) -> None:
        if self.kind is None:
            raise NotImplementedError(f"{self._owner} does not define an optimizer kind")

    def update_step(self, group: dict[str, Any], p: torch.Tensor, gindex: int, pindex: int,
                    config: Optional[dict[str, Any]] = None) -> None:  # fmt: skip
        """Apply one update to ``p`` with its state (layout chosen at :meth:`init_state`).

        ``config`` as for :meth:`init_state`.
        """
        self._require_kind()
        if config is None:
            config = self._checked_config(gindex, pindex, group, p)
        state = self.state[p]
        eight_bit, block_wise = self._layout(config, p)
        if not p.is_contiguous():
            p.data = p.data.contiguous()  # the kernels update p in place
        grad = p.grad
        state["step"] += 1
        step = state["step"]
        if p.numel() == 0:
            return  # nothing to update (as torch.optim: the step still counts); kernels need not take empty tensors

        gnorm_scale = 1.0
        if config["percentile_clipping"] < 100:
            fresh = "gnorm_vec" not in state  # clipping enabled by an override after step 1
            if fresh:
                state["gnorm_vec"] = torch.zeros(GNORM_HISTORY, dtype=torch.float32, device=p.device)
            _, _, gnorm_scale = F.percentile_clipping(
                grad, state["gnorm_vec"], 1 if fresh else step, config["percentile_clipping"]
            )
        unorm_vec = None
        if config["max_unorm"] > 0:
            unorm_vec = state.setdefault("unorm_vec", torch.zeros(1, dtype=torch.float32, device=p.device))

        betas = config["betas"]
        beta3, alpha = 0.0, 0.0
        if self.kind.reads_param("beta3"):
            beta3, alpha = ademamix_schedule(step, betas[0], betas[2], config["alpha"], config["t_alpha"], config["t_beta3"])
        layout = layout_of(eight_bit, block_wise)
        update = F.make_step(
            self._owner, self.kind, step, layout, skip_zeros=config["skip_zeros"], lr=config["lr"], beta1=betas[0],
            beta2=betas[1], beta3=beta3, alpha=alpha, eps=config["eps"], weight_decay=config["weight_decay"],
            gnorm_scale=gnorm_scale, max_unorm=config["max_unorm"],
        )  # fmt: skip
        if not eight_bit:
            F.apply_32bit(update, grad, p, state["state1"], state.get("state2"), unorm_vec)
        elif block_wise:
            F.apply_8bit_blockwise(
                update, grad, p, state["state1"], state.get("state2"), state["qmap1"], state.get("qmap2"),
                state["absmax1"], state.get("absmax2"),
            )  # fmt: skip
        else:
            F.apply_8bit(
                update, grad, p, state["state1"], state.get("state2"), state["qmap1"], state.get("qmap2"),
                state["max1"], state.get("max2"), state["new_max1"], state.get("new_max2"), unorm_vec,
            )  # fmt: skip
            # The new scales become the current ones; the old buffers receive the next ones.
            for which in (1, 2):
                if f"max{which}" in state:
                    state[f"max{which}"], state[f"new_max{which}"] = state[f"new_max{which}"], state[f"max{which}"]

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state with each parameter's quantization tensors nested under
        ``"__bnb_optimizer_quant_state__"`` (the bitsandbytes checkpoint layout)."""
        state_dict = super().state_dict()
        state_dict["state"] = {index: nest_quant_state(state) for index, state in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint in the nested or the flat layout.

        Every parameter's state is checked against the parameter (kind, shapes, dtypes,
        scales) before anything changes; a mismatch raises ``QuantStateError`` (a
        ``ValueError``) naming the entry. Tensors are copied to the parameter's device and
        never cast, so uint8 codes and float32 states load exactly.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        where = f"{self._owner}.load_state_dict"
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(saved_groups, list) or not isinstance(state_dict.get("state"), dict):
            raise KbitValueError(where, "state_dict", type(state_dict).__name__, "a dict with 'state' and 'param_groups'")
        if len(saved_groups) != len(self.param_groups):
            raise KbitValueError(where, "param_groups", f"{len(saved_groups)} groups", f"{len(self.param_groups)} like this optimizer")
        id_to_param: dict[Any, tuple[torch.Tensor, str, int, int]] = {}
        for gindex, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            _check_saved_group(where, gindex, saved, group)
            if len(saved["params"]) != len(group["params"]):
                raise KbitValueError(
                    where, f"param_groups[{gindex}]", f"{len(saved['params'])} parameters",
                    f"{len(group['params'])} like this optimizer's group {gindex}",
                )  # fmt: skip
            for pindex, (saved_id, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                id_to_param[saved_id] = (p, f"parameter {pindex} of group {gindex}", gindex, pindex)
        self.check_overrides()  # the expected layouts depend on module overrides too
        new_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for saved_id, param_state in state_dict["state"].items():
            if saved_id not in id_to_param:
                raise KbitValueError(where, "state", saved_id, "the index of a parameter in param_groups")
            p, label, gindex, pindex = id_to_param[saved_id]
            loaded = checked_param_state(self.kind, p, label, flat_param_state(param_state, label))
            if loaded:
                config = self.get_config(gindex, pindex, self.param_groups[gindex])
                check_state_layout(label, loaded, config, *self._new_layout(config, p))
            new_state[p] = loaded
        if self._allocator is not None:
            for p, loaded in new_state.items():
                self._page_loaded_state(p, loaded)
        new_groups = []
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            new_group = {key: value for key, value in saved.items() if key != "params"}
            new_group.update(check_group_hyperparameters(where, self.kind, new_group))
            new_group["params"] = group["params"]
            new_groups.append(new_group)
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _page_loaded_state(self, p: torch.Tensor, loaded: dict[str, Any]) -> None:
        """Move a validated checkpoint's state tensors of ``p`` into paged memory (a paged
        optimizer resumed from a checkpoint must page like one that started afresh)."""
        if not loaded:
            return
        op = layout_of(*state_layout(loaded)).op
        for key in ("state1", "state2"):
            if key in loaded:
                paged = self._zeros(tuple(loaded[key].shape), loaded[key].dtype, p, op)
                loaded[key] = paged.copy_(loaded[key])


def _check_saved_group(where: str, gindex: int, saved: Any, group: Mapping[str, Any]) -> None:
    """Refuse a checkpoint's parameter group without a list of integer ``params`` or
    without a hyperparameter this optimizer's group has (the next step would need it)."""
    params = saved.get("params") if isinstance(saved, Mapping) else None
    if not isinstance(params, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in params):
        found = type(saved).__name__ if not isinstance(saved, Mapping) else f"params={params!r}"
        raise KbitValueError(where, f"param_groups[{gindex}]", found, "a dict whose 'params' lists parameter indices")
    missing = [key for key in HYPERPARAMETERS if key in group and key not in saved]
    if missing:
        raise KbitValueError(
            where, f"param_groups[{gindex}]", f"a group without {missing[0]!r}",
            f"the hyperparameters this optimizer's groups hold: {[k for k in HYPERPARAMETERS if k in group]}",
        )  # fmt: skip


class _KindOptimizer(Optimizer8bit):
    """Shared constructor of :class:`Optimizer1State` and :class:`Optimizer2State`."""

    _num_states = 0

    def __init__(self, optimizer_name: str, params: Iterable[Any], lr: float, betas: Any, eps: float,
                 weight_decay: float, optim_bits: int, args: Any, min_8bit_size: int, *, percentile_clipping: int,
                 block_wise: bool, max_unorm: float, skip_zeros: bool, is_paged: bool,
                 extra: dict[str, Any]) -> None:  # fmt: skip
        owner = type(self).__name__
        kind = F.optimizer_kind(owner, optimizer_name)
        if kind.num_states != self._num_states:
            base = "Optimizer1State" if kind.num_states == 1 else "Optimizer2State"
            raise KbitValueError(owner, "optimizer_name", optimizer_name, f"a {self._num_states}-state kind; use {base}")
        self.kind = kind
        self.args = state_options(
            owner, args, self._fixed_optim_bits, optim_bits=optim_bits, min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros,
        )  # fmt: skip
        check_layout_options(owner, kind, vars(self.args), eight_bit=self.args.optim_bits == 8, block_wise=self.args.block_wise)
        defaults = check_group_hyperparameters(owner, kind, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra))
        super().__init__(params, defaults, self.args.optim_bits, is_paged)
        if self.is_paged:
            # Decided (and warned about) now, not at the first step: the user sees at once
            # whether paging is real. Each parameter asks about the op its state will use.
            self.check_overrides()
            uses = [
                (p, layout_of(*self._new_layout(self.get_config(gindex, pindex, group), p)).op)
                for gindex, group in enumerate(self.param_groups)
                for pindex, p in enumerate(group["params"])
            ]
            self._allocator = PagedAllocator(owner, uses, kind.name)


class Optimizer1State(_KindOptimizer):
    """Base of the one-state optimizers (momentum, lars, rmsprop, adagrad, lion).

    ``betas`` carries the kind's decay rates: ``(momentum, 0)`` for SGD and LARS,
    ``(alpha, 0)`` for RMSprop, ``(0, 0)`` for Adagrad and ``(beta1, beta2)`` for Lion.
    State options after ``min_8bit_size`` are keyword-only.
    """

    _num_states = 1

    def __init__(
        self,
        optimizer_name: str,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.0),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
    ) -> None:
        super().__init__(
            optimizer_name, params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm,
            skip_zeros=skip_zeros, is_paged=is_paged, extra={},
        )  # fmt: skip


class Optimizer2State(_KindOptimizer):
    """Base of the two-state optimizers (adam, lamb, ademamix).

    ``alpha``, ``t_alpha`` and ``t_beta3`` are AdEMAMix's (mixing weight and warm-up
    periods); other kinds refuse non-default values. State options after ``min_8bit_size``
    are keyword-only.
    """

    _num_states = 2

    def __init__(
        self,
        optimizer_name: str,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, ...] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
        alpha: float = 0.0,
        t_alpha: Optional[int] = None,
        t_beta3: Optional[int] = None,
    ) -> None:
        extra = dict(alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3) if optimizer_name == "ademamix" else {}
        if optimizer_name != "ademamix":
            check_group_hyperparameters(type(self).__name__, F.optimizer_kind(type(self).__name__, optimizer_name),
                                  dict(alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3))  # fmt: skip
        super().__init__(
            optimizer_name, params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm,
            skip_zeros=skip_zeros, is_paged=is_paged, extra=extra,
        )  # fmt: skip
