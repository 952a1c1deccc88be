"""One optimizer step as data: the kind table and the frozen description of an update.

Two objects are the whole scalar side of the optimizer contract between kbit and a backend:

- :class:`OptimizerKind` says what distinguishes a kind (``"adam"``, ``"lion"``, ...): the
  states it keeps, whether its weight decay is decoupled or L2, which hyperparameters and
  options its rule reads, and where the rule is written down. :data:`OPTIMIZER_KINDS` is
  the table every layer reads: the public API validates against it, the reference backend
  applies the rules by it, a vendor reads it instead of re-deriving it from prose.
- :class:`OptimizerStep` holds every scalar of one update (kind, step count, learning rate,
  betas, ...). It is created once per parameter update (by ``kbit.optim`` or by the
  ``kbit.functional`` update functions, after validation) and handed to the backend as one
  object. Only at the ``torch.library`` boundary, which takes scalars and lists of scalars,
  is it flattened (:meth:`OptimizerStep.to_op_args`) and rebuilt on the other side
  (:meth:`OptimizerStep.from_op_args`); the field list below is the one definition both
  directions read.

State layouts (32-bit, blockwise 8-bit, whole-tensor 8-bit) are in :data:`STATE_LAYOUTS`:
which op updates each and which options it can honour (:func:`layout_of` picks one).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

__all__ = [
    "OptimizerKind",
    "OPTIMIZER_KINDS",
    "OptimizerStep",
    "StateLayout",
    "STATE_LAYOUTS",
    "layout_of",
    "HYPERPARAMETERS",
    "OPTIONS",
]

#: The hyperparameters a kind's rule may read besides ``lr`` and ``weight_decay`` (which all
#: kinds take). A kind that does not read one requires it to be 0.
HYPERPARAMETERS = ("beta1", "beta2", "beta3", "alpha", "eps")

#: Optional behaviours of an update (``docs/formats.md`` section 5): trust-ratio clipping of
#: the update norm and leaving elements with an exactly zero gradient untouched.
OPTIONS = ("max_unorm", "skip_zeros")

_DECAY_MODES = ("decoupled", "l2")


@dataclasses.dataclass(frozen=True)
class OptimizerKind:
    """What one optimizer kind is, as data.

    Attributes:
        name: the kind's name in the API and in manifests (``OpSupport.optimizers``).
        states: what each state tensor holds, in order (``state1``, ``state2``).
        weight_decay: ``"decoupled"`` (the parameter is scaled by ``1 - lr * wd`` before the
            update, AdamW style) or ``"l2"`` (``wd * p`` is added to the gradient first).
        reads: the entries of :data:`HYPERPARAMETERS` the rule reads; the others must be 0.
        options: the entries of :data:`OPTIONS` the kind supports (a state layout may still
            refuse one; see :data:`STATE_LAYOUTS`).
        squared_states: the states (1-based) holding sums or averages of squared
            gradients: never negative, and the rule divides by their square root.
        static_8bit: whole-tensor 8-bit state (``optimizer_update_8bit``) can serve it.
        stacked_state1: ``state1`` stacks two moments on a leading axis of 2 (shape
            ``(2, *p.shape)``, blockwise absmax ``(2, nblocks)``).
        rule: where the update rule is written (``docs/formats.md`` section 5).
    """

    name: str
    states: tuple[str, ...]
    weight_decay: str
    reads: frozenset[str]
    options: frozenset[str] = frozenset(OPTIONS)
    squared_states: frozenset[int] = frozenset()
    static_8bit: bool = True
    stacked_state1: bool = False
    rule: str = ""

    def __post_init__(self) -> None:
        if self.weight_decay not in _DECAY_MODES:
            raise ValueError(f"{self.name}: weight_decay must be one of {_DECAY_MODES}, got {self.weight_decay!r}")
        unknown = (set(self.reads) - set(HYPERPARAMETERS)) | (set(self.options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"{self.name}: unknown hyperparameters or options {sorted(unknown)}")
        if not 1 <= len(self.states) <= 2:
            raise ValueError(f"{self.name}: a kind keeps one or two states, got {self.states}")

    @property
    def num_states(self) -> int:
        """How many state tensors the kind keeps (1 or 2)."""
        return len(self.states)

    @property
    def decoupled_decay(self) -> bool:
        """True when weight decay scales the parameter instead of adding to the gradient."""
        return self.weight_decay == "decoupled"

    def reads_param(self, name: str) -> bool:
        """Whether the rule reads hyperparameter ``name`` (``lr`` and ``weight_decay``: always)."""
        return name not in HYPERPARAMETERS or name in self.reads


def _kind(name: str, states: str, weight_decay: str, reads: str, **more: object) -> OptimizerKind:
    return OptimizerKind(
        name,
        tuple(states.split(",")),
        weight_decay,
        frozenset(reads.split()),
        rule=f"docs/formats.md#{name}",
        **more,  # type: ignore[arg-type]
    )


_FIRST, _SECOND = frozenset({1}), frozenset({2})

#: Every optimizer kind, by name. The update rules are ``docs/formats.md`` section 5.
OPTIMIZER_KINDS: Mapping[str, OptimizerKind] = {
    kind.name: kind
    for kind in (
        _kind("adam", "first moment m,second moment v", "decoupled", "beta1 beta2 eps", squared_states=_SECOND),
        _kind("lamb", "first moment m,second moment v", "decoupled", "beta1 beta2 eps", squared_states=_SECOND),
        _kind("ademamix", "fast and slow first moments (m1; m2) stacked,second moment nu", "decoupled",
              "beta1 beta2 beta3 alpha eps", squared_states=_SECOND, static_8bit=False, stacked_state1=True),  # fmt: skip
        _kind("lion", "momentum", "decoupled", "beta1 beta2"),
        _kind("momentum", "momentum buffer", "l2", "beta1"),
        _kind("lars", "momentum buffer", "l2", "beta1"),
        _kind("rmsprop", "mean square (decay rate beta1)", "l2", "beta1 eps", squared_states=_FIRST),
        _kind("adagrad", "sum of squares", "l2", "eps", squared_states=_FIRST),
    )
}


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How a parameter's optimizer state is stored, and which op updates it.

    ``options`` are the entries of :data:`OPTIONS` the layout can honour; an optimizer asked
    for another one with this layout refuses instead of ignoring it.
    """

    name: str
    op: str
    eight_bit: bool
    block_wise: bool
    options: frozenset[str]


#: The three state layouts, by name.
STATE_LAYOUTS: Mapping[str, StateLayout] = {
    layout.name: layout
    for layout in (
        StateLayout("32-bit", "optimizer_update_32bit", False, False, frozenset(OPTIONS)),
        StateLayout("blockwise 8-bit", "optimizer_update_8bit_blockwise", True, True, frozenset({"skip_zeros"})),
        StateLayout("whole-tensor 8-bit", "optimizer_update_8bit", True, False, frozenset({"max_unorm"})),
    )
}


def layout_of(eight_bit: bool, block_wise: bool) -> StateLayout:
    """The :class:`StateLayout` of a state that is (or will be) ``eight_bit`` / ``block_wise``.

    ``block_wise`` only matters for 8-bit state: 32-bit state has no scales to block.
    """
    if not eight_bit:
        return STATE_LAYOUTS["32-bit"]
    return STATE_LAYOUTS["blockwise 8-bit" if block_wise else "whole-tensor 8-bit"]


@dataclasses.dataclass(frozen=True)
class OptimizerStep:
    """Every scalar of one optimizer update, handed to a backend as one object.

    Hyperparameters the kind does not read are 0 (the public API enforces it; see
    :attr:`OptimizerKind.reads`). ``step`` is the 1-based count of this update (bias
    corrections use it). ``gnorm_scale`` multiplies the gradient first (percentile
    clipping). With ``max_unorm > 0`` the update is scaled down to at most
    ``max_unorm * ||p||`` and its squared norm stored in ``unorm_vec``. With
    ``skip_zeros`` elements whose gradient is exactly 0 keep their parameter and state.
    """

    kind: OptimizerKind
    step: int
    lr: float
    beta1: float = 0.0
    beta2: float = 0.0
    beta3: float = 0.0
    alpha: float = 0.0
    eps: float = 0.0
    weight_decay: float = 0.0
    gnorm_scale: float = 1.0
    max_unorm: float = 0.0
    skip_zeros: bool = False

    #: The float fields, in the order :meth:`to_op_args` lists them.
    SCALARS = ("lr", "beta1", "beta2", "beta3", "alpha", "eps", "weight_decay", "gnorm_scale", "max_unorm")

    @property
    def decoupled_decay(self) -> bool:
        """True when this step applies weight decay to the parameter directly (AdamW style)."""
        return self.weight_decay > 0 and self.kind.decoupled_decay

    @property
    def l2_decay(self) -> bool:
        """True when this step adds ``weight_decay * p`` to the gradient (L2 style)."""
        return self.weight_decay > 0 and not self.kind.decoupled_decay

    def to_op_args(self) -> tuple[str, int, list[float], bool]:
        """The flat form the ``torch.ops.kbit`` update ops take: ``(kind, step, scalars, skip_zeros)``."""
        return self.kind.name, self.step, [float(getattr(self, name)) for name in self.SCALARS], self.skip_zeros

    @classmethod
    def from_op_args(cls, kind: str, step: int, scalars: Sequence[float], skip_zeros: bool) -> "OptimizerStep":
        """Rebuild the step from :meth:`to_op_args`'s flat form (inside an op's kernel)."""
        if len(scalars) != len(cls.SCALARS):
            raise ValueError(f"expected {len(cls.SCALARS)} scalars {cls.SCALARS}, got {len(scalars)}")
        return cls(OPTIMIZER_KINDS[kind], step, **dict(zip(cls.SCALARS, scalars, strict=True)), skip_zeros=skip_zeros)
