"""The 8-bit blockwise format in NumPy: arrays in, arrays out, no torch.

Numerics follow kbit's format contract (docs/formats.md): blocks are consecutive runs of
``blocksize`` elements of the flattened input, the last one possibly partial; ``absmax``
is each block's largest magnitude in float32; a value is normalised as ``x * (1/absmax)``
(reciprocal first, both steps in float32) and stored as the index of the nearest code
value, ties going to the lower index; dequantization is ``code[index] * absmax`` in
float32, then cast. An all-zero block normalises to zeros.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "block_absmax",
    "nearest_code_index",
    "quantize_blockwise",
    "dequantize_blockwise",
    "scatter_add_2d",
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
    code may be unsorted or hold duplicates (the lowest index holding a value wins); NaN
    maps to the largest code value.
    """
    order = np.argsort(code, kind="stable")
    table = code[order].astype(np.float64)
    x = values.astype(np.float64)
    upper = np.clip(np.searchsorted(table, x, side="left"), 1, table.size - 1)
    lower = upper - 1
    # Of equal code values, the first in stable order has the lowest original index.
    lower = np.searchsorted(table, table[lower], side="left")
    nearer_upper = (table[upper] - x) < (x - table[lower])
    position = np.where(nearer_upper, upper, lower)
    position = np.where(np.isnan(x), table.size - 1, position)
    return order[position]


def quantize_blockwise(values: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 codes shaped like values, float32 absmax per block)``."""
    flat = values.reshape(-1).astype(np.float32)
    absmax = block_absmax(flat, blocksize)
    inverse = np.zeros_like(absmax)
    np.divide(np.float32(1), absmax, out=inverse, where=absmax != 0)
    normalised = (_blocks(flat, blocksize) * inverse[:, None]).reshape(-1)[: flat.size]
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
