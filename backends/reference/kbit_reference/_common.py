"""Numerics shared by the reference op families: block statistics and nearest-code search.

Everything here is vectorised PyTorch: no Python loop over blocks or elements, so the
reference stays usable on large tensors and on any device torch supports.
"""

from __future__ import annotations

import torch

__all__ = ["block_absmax", "blockwise_apply", "nearest_code_index", "stochastic_code_index", "reciprocal_or_zero"]


def _split_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the full blocks (``[nblocks, blocksize]``) and of the partial tail."""
    full = flat.numel() // blocksize * blocksize
    return flat[:full].view(-1, blocksize), flat[full:]


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``max |x|`` over consecutive blocks of a 1-D tensor, as float32.

    The last block may be partial. NaN anywhere in a block makes its absmax NaN, and
    ``inf`` makes it ``inf``, so a poisoned block stays visibly poisoned.
    """
    full, tail = _split_blocks(flat, blocksize)
    parts = []
    if full.numel():
        # aminmax avoids materialising |x|, a temporary the size of the input.
        low, high = torch.aminmax(full, dim=1)
        parts.append(torch.maximum(-low, high))
    if tail.numel():
        low, high = torch.aminmax(tail)
        parts.append(torch.maximum(-low, high).reshape(1))
    if not parts:
        return flat.new_empty((0,), dtype=torch.float32)
    return torch.cat(parts).to(torch.float32)


def reciprocal_or_zero(absmax: torch.Tensor) -> torch.Tensor:
    """``1 / absmax`` in float32, with 0 for all-zero blocks (which then quantize to 0)."""
    return torch.where(absmax == 0, torch.zeros_like(absmax), torch.reciprocal(absmax))


def blockwise_apply(flat: torch.Tensor, per_block: torch.Tensor, blocksize: int, out: torch.Tensor) -> torch.Tensor:
    """``out[i] = flat[i] * per_block[i // blocksize]`` without expanding ``per_block``.

    ``out`` may have another dtype than the float32 product; the cast happens on store.
    """
    full_in, tail_in = _split_blocks(flat, blocksize)
    full_out, tail_out = _split_blocks(out, blocksize)
    nfull = full_in.shape[0]
    if nfull:
        torch.mul(full_in, per_block[:nfull, None], out=full_out)
    if tail_in.numel():
        torch.mul(tail_in, per_block[nfull], out=tail_out)
    return out


def _boundaries(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision boundaries for exact nearest-code search with ties to the lower index.

    Returns ``(bounds, index)``: a value ``x`` (float32) belongs to code
    ``index[k]`` where ``k`` is the number of bounds strictly below ``x``. The midpoint
    between two neighbouring code values is computed exactly (in float64); it is then
    rounded to a float32 boundary on the side that reproduces the exact comparison, so
    the search itself runs in float32.
    """
    code64 = code.to(torch.float64)
    order = torch.sort(code64, stable=True).indices
    values = code64[order]
    # Equal values (FP4's two zeros) collapse onto the lowest index holding them.
    keep = torch.ones_like(values, dtype=torch.bool)
    keep[1:] = values[1:] != values[:-1]
    values, index = values[keep], order[keep]
    mids = (values[:-1] + values[1:]) / 2
    mids32 = mids.to(torch.float32)
    down = torch.nextafter(mids32, torch.full_like(mids32, -torch.inf))
    # x > mid   <=>  x > (largest float32 <= mid)          (tie stays with the lower value)
    # x >= mid  <=>  x > (largest float32 <  mid)          (tie goes to the upper value)
    at_or_below = torch.where(mids32.to(torch.float64) > mids, down, mids32)
    strictly_below = torch.where(mids32.to(torch.float64) >= mids, down, mids32)
    lower_index_wins = index[:-1] < index[1:]
    bounds = torch.where(lower_index_wins, at_or_below, strictly_below)
    return bounds.contiguous(), index


def nearest_code_index(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the code value nearest to each float32 value; ties go to the lower index.

    ``code`` may be in any order (the FP4 table is not sorted). NaN maps to the index of
    the largest code value. Returns int32 indices with ``values``' shape.
    """
    bounds, index = _boundaries(code)
    position = torch.bucketize(values, bounds, out_int32=True)
    if torch.equal(index, torch.arange(index.numel(), device=index.device)):
        return position  # sorted table without duplicates: position is the index
    return index.to(torch.int32)[position.long()]


def stochastic_code_index(values: torch.Tensor, code: torch.Tensor, rand: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of float32 ``values`` onto the sorted table ``code`` (int32 indices).

    With ``lo <= x <= hi`` the neighbouring code values (clamped to the table's ends, so
    ``lo == hi`` outside it or on a code value), ``x`` takes ``hi`` when
    ``rand < (x - lo) / (hi - lo)`` in float32, else ``lo``; a value held by several
    entries maps to the lowest index holding it, and NaN to the index of the largest value,
    as in :func:`nearest_code_index`. ``rand`` is read cyclically when it is shorter than
    ``values`` (``docs/formats.md`` section 2).
    """
    flat = values.reshape(-1)
    n = flat.numel()
    r = rand.reshape(-1)
    if r.numel() < n:
        r = r.repeat(-(-n // r.numel()))[:n]
    elif r.numel() > n:
        r = r[:n]
    last = code.numel() - 1
    above = torch.searchsorted(code, flat, right=True)  # entries <= x
    lo_value = code[(above - 1).clamp_(0, last)]
    hi_value = code[torch.searchsorted(code, flat).clamp_(max=last)]  # first entry >= x
    spread = hi_value - lo_value
    fraction = torch.where(spread > 0, (flat - lo_value) / torch.where(spread > 0, spread, 1.0), 0.0)
    chosen = torch.where(r < fraction, hi_value, lo_value)
    index = torch.searchsorted(code, chosen, out_int32=True)  # lowest index holding the value
    nan_index = torch.searchsorted(code, code.max().reshape(1), out_int32=True)
    index = torch.where(flat.isnan(), nan_index, index)
    return index.reshape(values.shape)
