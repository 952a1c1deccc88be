"""kbit's 8-bit blockwise and 4-bit (NF4/FP4) formats in NumPy: arrays in, arrays out, no torch.

Numerics follow kbit's format contract (docs/formats.md): blocks are consecutive runs of
``blocksize`` elements of the flattened input, the last one possibly partial; ``absmax``
is each block's largest magnitude in float32; a value is normalised as ``x * (1/absmax)``
(reciprocal first, both steps in float32) and stored as the index of the nearest code
value, ties going to the lower index; dequantization is ``code[index] * absmax`` in
float32, then cast. An all-zero block normalises to zeros.

4-bit codes are packed two per byte, element ``2j`` in the high nibble; an odd count pads
the last low nibble with the code of zero, and the bytes are zero-padded to whole storage
elements (the caller views them as its storage dtype).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "block_absmax",
    "nearest_code_index",
    "quantize_blockwise",
    "dequantize_blockwise",
    "scatter_add_2d",
    "quantize_4bit",
    "dequantize_4bit",
]


def _blocks(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """``flat`` zero-padded to whole blocks, as a ``[blocks, blocksize]`` array."""
    count = -(-flat.size // blocksize)
    padded = np.zeros(count * blocksize, dtype=flat.dtype)
    padded[: flat.size] = flat
    return padded.reshape(count, blocksize)


def block_absmax(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """Largest ``|x|`` of each block, float32 (padding zeros never win: ``|x| >= 0``)."""
    return np.abs(_blocks(flat.astype(np.float32), blocksize)).max(axis=1, initial=np.float32(0))


def nearest_code_index(values: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest ``code`` value for each float32 value; ties go to the lower index.

    Exact: the two neighbours are found with a binary search, and the distances to them are
    compared in float64, where the difference of two nearby float32 numbers is exact. The
    code may be unsorted (FP4's table is) or hold duplicates (the lowest index holding a
    value wins); at an exact tie the neighbour with the lower *index* wins, which for an
    unsorted table is not always the lower value. NaN maps to the largest code value.
    """
    order = np.argsort(code, kind="stable")
    table = code[order].astype(np.float64)
    x = values.astype(np.float64)
    upper = np.clip(np.searchsorted(table, x, side="left"), 1, table.size - 1)
    lower = upper - 1
    # Of equal code values, the first in stable order has the lowest original index.
    first = np.searchsorted(table, table, side="left")
    lower, upper = first[lower], first[upper]
    below, above = x - table[lower], table[upper] - x
    nearer_upper = (above < below) | ((above == below) & (order[upper] < order[lower]))
    position = np.where(nearer_upper, upper, lower)
    position = np.where(np.isnan(x), table.size - 1, position)
    return order[position]


def _normalised(values: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x * (1 / absmax[block]) flattened, absmax)``, all float32; zeros in all-zero blocks."""
    flat = values.reshape(-1).astype(np.float32)
    absmax = block_absmax(flat, blocksize)
    inverse = np.zeros_like(absmax)
    np.divide(np.float32(1), absmax, out=inverse, where=absmax != 0)
    with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as in any IEEE multiply
        normalised = (_blocks(flat, blocksize) * inverse[:, None]).reshape(-1)[: flat.size]
    return normalised, absmax


def quantize_blockwise(values: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 codes shaped like values, float32 absmax per block)``."""
    normalised, absmax = _normalised(values, blocksize)
    codes = nearest_code_index(normalised, code.astype(np.float32)).astype(np.uint8)
    return codes.reshape(values.shape), absmax


def dequantize_blockwise(
    codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, dtype: np.dtype
) -> np.ndarray:
    """``code[codes] * absmax[block]`` in float32, cast to ``dtype``, shaped like ``codes``."""
    values = code.astype(np.float32)[codes.reshape(-1)]
    scaled = (_blocks(values, blocksize) * absmax.astype(np.float32)[:, None]).reshape(-1)[: values.size]
    with np.errstate(over="ignore"):  # beyond float16's range is inf, as in any IEEE cast
        return scaled.astype(dtype).reshape(codes.shape)


def scatter_add_2d(histogram: np.ndarray, index1: np.ndarray, index2: np.ndarray, source: np.ndarray) -> None:
    """In place: ``histogram[index1[i], index2[i]] += source[i]``, repeated indices accumulating."""
    np.add.at(histogram, (index1.astype(np.intp), index2.astype(np.intp)), source.astype(histogram.dtype))


def quantize_4bit(
    values: np.ndarray, table: np.ndarray, blocksize: int, itemsize: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(packed uint8 bytes, float32 absmax per block)`` for the 16-value ``table``.

    The bytes are zero-padded to a multiple of ``itemsize``, the size of the storage dtype
    the caller views them as.
    """
    table = table.astype(np.float32)
    normalised, absmax = _normalised(values, blocksize)
    codes = nearest_code_index(normalised, table).astype(np.uint8)
    if codes.size % 2:
        zero = nearest_code_index(np.zeros(1, dtype=np.float32), table).astype(np.uint8)
        codes = np.concatenate([codes, zero])
    pairs = codes.reshape(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    padded = np.zeros(-(-packed.size // itemsize) * itemsize, dtype=np.uint8)
    padded[: packed.size] = packed
    return padded, absmax


def dequantize_4bit(
    packed: np.ndarray, absmax: np.ndarray, table: np.ndarray, blocksize: int, shape: tuple, dtype: np.dtype
) -> np.ndarray:
    """``table[code] * absmax[block]`` in float32, cast to ``dtype``, of ``shape``.

    ``packed`` is the flat uint8 byte stream; bytes past the codes of ``shape`` (padding)
    are ignored.
    """
    numel = int(np.prod(shape, dtype=np.int64))
    data = packed.reshape(-1)[: (numel + 1) // 2]
    codes = np.stack([data >> 4, data & 15], axis=1).reshape(-1)[:numel]
    values = table.astype(np.float32)[codes]
    scaled = (_blocks(values, blocksize) * absmax.astype(np.float32)[:, None]).reshape(-1)[:numel]
    with np.errstate(over="ignore"):  # beyond float16's range is inf, as in any IEEE cast
        return scaled.astype(dtype).reshape(shape)
