"""Format constants of kbit's quantized layouts, in one place.

These values are part of the on-disk and backend contract (``docs/formats.md``): the
public API validates against them, the reference backend declares them in its manifest,
and the conformance cases enumerate them. Every other module imports them from here so
the layers cannot drift apart.
"""

from __future__ import annotations

import torch

__all__ = [
    "FLOAT_DTYPES",
    "FLOAT_DTYPE_NAMES",
    "BLOCKSIZES_8BIT",
    "BLOCKSIZES_8BIT_LARGE",
    "BLOCKSIZES_8BIT_ALL",
    "BLOCKSIZES_4BIT",
    "QUANT_TYPES_4BIT",
    "QUANT_STORAGES_4BIT",
    "QUANT_STORAGE_NAMES_4BIT",
    "NESTED_BLOCKSIZE",
    "OPTIMIZER_BLOCKSIZE",
    "GNORM_HISTORY",
    "dtype_name",
    "num_blocks",
]


def dtype_name(dtype: torch.dtype | str) -> str:
    """The manifest spelling of a dtype: ``torch.float16`` -> ``"float16"``.

    A string is taken to be a name already and returned unchanged, so callers that accept
    either form need no branch of their own.
    """
    if isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


def num_blocks(numel: int, blocksize: int) -> int:
    """Blocks needed for ``numel`` elements: the last block may be partial, so round up."""
    return -(-numel // blocksize)


#: Floating dtypes every quantize op accepts and every dequantize op can produce.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: :data:`FLOAT_DTYPES` as manifest names.
FLOAT_DTYPE_NAMES = tuple(dtype_name(dtype) for dtype in FLOAT_DTYPES)

#: Entries of an 8-bit code table: one value per byte.
CODE_TABLE_SIZE = 256
#: Blocksizes of 8-bit blockwise quantization (what every backend of the format serves).
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)
#: Larger 8-bit blocksizes: bitsandbytes accepts them on CPU (its tests use 16384) and the
#: format's rules hold for any power of two >= 64. The reference backend serves these on
#: every device; other backends need not (kbit then falls back, with a warning).
BLOCKSIZES_8BIT_LARGE = (8192, 16384, 32768, 65536)
#: Every 8-bit blocksize the public API accepts.
BLOCKSIZES_8BIT_ALL = BLOCKSIZES_8BIT + BLOCKSIZES_8BIT_LARGE
#: Blocksizes of 4-bit quantization (32 is 4-bit only).
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: 4-bit value types.
QUANT_TYPES_4BIT = ("nf4", "fp4")
#: dtypes packed 4-bit data may be stored as (the bytes are only reinterpreted).
QUANT_STORAGES_4BIT = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
#: :data:`QUANT_STORAGES_4BIT` as manifest names.
QUANT_STORAGE_NAMES_4BIT = tuple(dtype_name(dtype) for dtype in QUANT_STORAGES_4BIT)

#: Blocksize of the nested (8-bit) quantization of a blockwise absmax.
NESTED_BLOCKSIZE = 256

#: Block length of blockwise 8-bit optimizer state.
OPTIMIZER_BLOCKSIZE = 256
#: Slots of the gradient-norm history used by percentile clipping.
GNORM_HISTORY = 100
