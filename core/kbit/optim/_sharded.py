"""Optimizer state of DTensor parameters (FSDP2's sharded parameters, tensor parallelism).

A DTensor parameter is stepped in one of two modes, decided per parameter and step:

- **local** (the usual case): the update runs on this rank's shard of the parameter and the
  gradient, and the state is a DTensor placed like the parameter, so each rank holds (and
  checkpoints) the state of its own shard. Element-wise 32-bit updates allow any placement.
  Blockwise 8-bit state additionally needs its blocks of 256 elements to be the
  single-process blocks, none straddling two shards: the parameter must be sharded on dim 0
  only and every shard boundary must fall on a block boundary (true of the usual widths:
  hidden sizes are multiples of 256, so is ``rows_per_rank * row_length``). Then ``absmax``
  is itself a DTensor sharded on its block axis, the update is the single-process one, and
  checkpoints reshard to any world size whose boundaries also fall on blocks.
- **gathered**: updates that need whole-tensor quantities (``max_unorm`` of LAMB/LARS,
  ``percentile_clipping``, whole-tensor 8-bit state) or blockwise state whose blocks would
  straddle shards run on the whole tensor, gathered on every rank, with replicated state;
  each rank then keeps its own shard of the result. Exactly the single-process update, at
  the cost of an all-gather per step and unsharded state for that parameter.

Every per-element state (``state1``, ``state2``, ``absmax1``, ``absmax2``) of a DTensor
parameter is itself a DTensor, so ``torch.distributed.checkpoint`` saves each rank's part
and reshards on load; a state that arrives with other placements (a checkpoint, a change of
mode) is redistributed before use. Scalars and histories (``max1``, ``gnorm_vec``, ...)
are computed from whole tensors and are plain, identical tensors on every rank.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from .._dtensor import is_dtensor
from .._formats import OPTIMIZER_BLOCKSIZE, num_blocks

__all__ = [
    "LOCAL", "GATHERED", "DTENSOR_STATE_KEYS", "step_mode", "new_state", "with_local", "ShardedStep", "agree_on_bad_grads",
]  # fmt: skip

LOCAL = "local"
GATHERED = "gathered"

#: State entries that hold one value per element (or per block) of the parameter.
DTENSOR_STATE_KEYS = frozenset({"state1", "state2", "absmax1", "absmax2"})


def _shard_dims(p: Any) -> list[int]:
    from torch.distributed.tensor import Replicate, Shard

    dims = []
    for placement in p.placements:
        if isinstance(placement, Shard):
            dims.append(placement.dim)
        elif not isinstance(placement, Replicate):
            return [-1]  # Partial or a strided shard: no local block structure to rely on
    return dims


def blocks_follow_shards(p: Any) -> bool:
    """Whether blockwise 8-bit state of DTensor ``p`` can be kept per shard, exactly as one process.

    Needs a single ``Shard(0)`` (other mesh dimensions replicated), every shard boundary on
    a multiple of 256 elements, and the shards of the block axis (DTensor splits every axis
    like ``torch.chunk``) to cover exactly the blocks of the parameter's shards.
    """
    dims = _shard_dims(p)
    if not dims:
        return True  # replicated: every rank holds the whole tensor
    if dims != [0] or p.dim() == 0:
        return False
    from torch.distributed.tensor import Shard

    ranks = p.device_mesh.size(next(i for i, placement in enumerate(p.placements) if isinstance(placement, Shard)))
    rows, numel = p.shape[0], p.numel()
    if rows == 0 or numel == 0:
        return True
    row_length = numel // rows
    shard_elements = math.ceil(rows / ranks) * row_length
    if shard_elements % OPTIMIZER_BLOCKSIZE:
        return False
    return math.ceil(num_blocks(numel, OPTIMIZER_BLOCKSIZE) / ranks) == shard_elements // OPTIMIZER_BLOCKSIZE


def step_mode(p: torch.Tensor, config: dict[str, Any], eight_bit: bool, block_wise: bool) -> Optional[str]:
    """``None`` for a plain parameter, else :data:`LOCAL` or :data:`GATHERED` (module docstring)."""
    if not is_dtensor(p):
        return None
    if config["max_unorm"] > 0 or config["percentile_clipping"] < 100:
        return GATHERED
    if _shard_dims(p) == [-1]:
        return GATHERED
    if eight_bit and (not block_wise or not blocks_follow_shards(p)):
        return GATHERED
    return LOCAL


def _state_placements(p: Any, key: str, stacked: bool, mode: str) -> tuple:
    """Placements of state ``key`` of ``p``: like ``p`` (shifted past AdEMAMix's stacking axis)."""
    from torch.distributed.tensor import Replicate, Shard

    if mode == GATHERED:
        return tuple(Replicate() for _ in p.placements)
    # Blockwise state is local only when p is sharded on dim 0, so its blocks are sharded on
    # their one axis (after the stacking axis).
    shift = 1 if stacked and key in ("state1", "absmax1") else 0
    return tuple(Shard(placement.dim + shift) if isinstance(placement, Shard) else placement for placement in p.placements)


def _local_shape(p: Any, key: str, stacked: bool, mode: str) -> tuple[int, ...]:
    shape = tuple(p.shape) if mode == GATHERED else tuple(p._local_tensor.shape)
    lead = (2,) if stacked and key in ("state1", "absmax1") else ()
    if key.startswith("absmax"):
        return lead + (num_blocks(math.prod(shape), OPTIMIZER_BLOCKSIZE),)
    return lead + shape


def new_state(p: Any, key: str, dtype: torch.dtype, stacked: bool, mode: str,
              zeros: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]) -> Any:  # fmt: skip
    """A zero DTensor for state ``key`` of DTensor ``p`` (``zeros`` allocates its local part)."""
    from torch.distributed.tensor import DTensor

    lead = (2,) if stacked and key in ("state1", "absmax1") else ()
    if key.startswith("absmax"):
        shape = lead + (num_blocks(p.numel(), OPTIMIZER_BLOCKSIZE),)
    else:
        shape = lead + tuple(p.shape)
    local = zeros(_local_shape(p, key, stacked, mode), dtype)
    placements = _state_placements(p, key, stacked, mode)
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def with_local(value: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` in ``value``'s place: ``value``'s DTensor wrapping ``local`` instead, or ``local``."""
    if not is_dtensor(value):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                              stride=value.stride())  # fmt: skip


def _placed(value: torch.Tensor, mesh: Any, placements: tuple) -> Any:
    """``value`` as a DTensor on ``mesh`` with ``placements`` (redistributed or split as needed)."""
    from torch.distributed.tensor import distribute_tensor

    if is_dtensor(value):
        if tuple(value.placements) == placements and value.device_mesh == mesh:
            return value
        return value.redistribute(mesh, placements)
    # A plain state (a single-process checkpoint) holds the whole value on every rank.
    return distribute_tensor(value, mesh, placements, src_data_rank=None)


class ShardedStep:
    """The tensors one step of DTensor ``p`` works on, in ``mode``; :meth:`finish` completes it.

    Attributes:
        param, grad: what the update kernels read and write: the local shards (``LOCAL``)
            or whole tensors gathered on every rank (``GATHERED``).
        state: the parameter's state with every DTensor entry replaced by the local tensor
            the kernels update in place (the DTensors in the optimizer's state share it).
    """

    def __init__(self, p: Any, state: dict[str, Any], mode: str, stacked: bool) -> None:
        self._p = p
        self._mode = mode
        grad = p.grad
        if is_dtensor(grad) and tuple(grad.placements) != tuple(p.placements):
            grad = grad.redistribute(p.device_mesh, p.placements)
        for key in DTENSOR_STATE_KEYS & state.keys():
            state[key] = _placed(state[key], p.device_mesh, _state_placements(p, key, stacked, mode))
        if mode == GATHERED:
            self.param = p.full_tensor()
            self.grad = grad.full_tensor() if is_dtensor(grad) else grad
        else:
            self.param = p._local_tensor
            self.grad = grad._local_tensor if is_dtensor(grad) else grad
        self.state = {key: value._local_tensor if is_dtensor(value) else value for key, value in state.items()}

    def finish(self) -> None:
        """Keep this rank's shard of a gathered update (nothing to do for a local one)."""
        if self._mode != GATHERED:
            return
        from torch.distributed.tensor import distribute_tensor

        p = self._p
        mine = distribute_tensor(self.param, p.device_mesh, p.placements, src_data_rank=None)
        p._local_tensor.copy_(mine._local_tensor)


def agree_on_bad_grads(params: list[torch.Tensor], bad: list[bool]) -> list[bool]:
    """``bad`` combined over every rank sharing a mesh with a DTensor in ``params``.

    A gradient shard with NaN/inf on one rank must stop the step on every rank: otherwise the
    other ranks update their shards and the model is left half stepped.
    """
    meshes = []
    for p in params:
        if is_dtensor(p) and all(p.device_mesh != mesh for mesh in meshes):
            meshes.append(p.device_mesh)
    if not meshes:
        return bad
    from torch.distributed.tensor import DTensor, Partial

    flags = torch.tensor([float(flag) for flag in bad], dtype=torch.float32)
    for mesh in meshes:
        local = flags.to(mesh.device_type)
        reduced = DTensor.from_local(local, mesh, [Partial("max")] * mesh.ndim, run_check=False).full_tensor()
        flags = torch.maximum(flags, reduced.cpu())
    return [bool(flag) for flag in flags.tolist()]
