"""When an optimizer keeps a DTensor parameter's 8-bit state per shard (kbit.optim._sharded).

The multi-process behaviour is in test_distributed.py; these are the rules, checked on
stand-ins that have a DTensor's shape and placements, in one process.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from kbit.optim import _sharded


def stand_in(shape: tuple[int, ...], placements: tuple, mesh_shape: tuple[int, ...]) -> types.SimpleNamespace:
    """What blocks_follow_shards reads of a DTensor: shape, placements and the mesh's sizes."""
    tensor = torch.empty(shape, device="meta")
    mesh = types.SimpleNamespace(size=lambda dim: mesh_shape[dim])
    return types.SimpleNamespace(shape=tensor.shape, numel=tensor.numel, dim=tensor.dim, placements=placements,
                                 device_mesh=mesh)  # fmt: skip


@pytest.mark.parametrize(
    "shape, ranks, expected",
    [
        ((16, 256), 2, True),  # a LoRA A: rows of 256, any row boundary is a block boundary
        ((256, 16), 2, True),  # a LoRA B: 128 rows x 16 = 2048 elements per rank
        ((1024, 16), 8, True),
        ((10, 30), 2, False),  # 150 elements per rank: a block would straddle
        ((3, 512), 2, False),  # shards of 1024 and 512 elements, but DTensor splits 6 blocks 3 + 3
        ((5, 256), 4, True),  # 2 + 2 + 1 + 0 rows, blocks split alike
        ((4096,), 2, True),
        ((4000,), 2, False),  # 2000 elements per rank
    ],
)
def test_blocks_follow_shards_on_dim_0(shape, ranks, expected):
    assert _sharded.blocks_follow_shards(stand_in(shape, (Shard(0),), (ranks,))) is expected


def test_blocks_follow_replicated_but_not_other_dims():
    assert _sharded.blocks_follow_shards(stand_in((10, 30), (Replicate(),), (2,)))
    assert not _sharded.blocks_follow_shards(stand_in((256, 256), (Shard(1),), (2,)))
    # HSDP: replicated across one mesh dimension, sharded on dim 0 across the other.
    assert _sharded.blocks_follow_shards(stand_in((256, 16), (Replicate(), Shard(0)), (2, 2)))


def test_plain_tensors_are_not_sharded():
    config = {"max_unorm": 0.0, "percentile_clipping": 100}
    assert _sharded.step_mode(torch.zeros(4), config, True, True) is None
