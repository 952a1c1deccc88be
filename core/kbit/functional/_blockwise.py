"""8-bit quantization: blockwise (with optional nested absmax), whole-tensor and code-only.

Numerics (``docs/formats.md``): values are normalised per block as ``x * (1 / absmax)``
and mapped to the nearest code value, ties to the lower index; dequantization is
``code[i] * absmax`` in float32, cast to the requested dtype. An all-zero block
dequantizes to zeros. A block holding NaN or +-inf gets a non-finite absmax, and every
value of that block dequantizes to a non-finite value: the damage stays visible and
confined to its block.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._errors import KbitValueError, QuantStateError
from .._formats import BLOCKSIZES_8BIT_ALL, FLOAT_DTYPES, NESTED_BLOCKSIZE, num_blocks
from .._ops import blockwise8 as ops
from .._ops import call_with_backend, dispatcher_needed, write_stamp
from ._codebooks import cached_code
from ._quant_state import EXPANDED_ABSMAX, QuantState
from ._validate import (
    check_buffer,
    check_choice,
    check_code,
    check_codes,
    check_dtype,
    check_int,
    check_numel,
    check_payload_numel,
    check_real,
    check_tensor,
    store_into,
)

__all__ = [
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize",
    "dequantize",
    "quantize_no_absmax",
    "dequantize_no_absmax",
    "estimate_quantiles",
    "histogram_scatter_add_2d",
]

def _code_for(
    op: str, code: Optional[torch.Tensor], device: torch.device, *, given: bool = True, for_search: bool = False
) -> torch.Tensor:
    """The table to use: the signed dynamic map by default, else ``code``, checked.

    A table the caller passed in (``given``) has its values inspected too (finite, and
    sorted when it is searched); the table of an existing state only its shape, since
    kbit built it or its checkpoint reader checked it, and a per-call read would cost a
    device synchronisation.
    """
    if code is None:
        return cached_code("dynamic", device)
    return check_code(op, code, inspect_values=given, for_search=for_search).to(device)


#: Shortest ``rand`` buffer that may be read cyclically (``docs/formats.md`` section 2).
MIN_CYCLIC_RAND = 1024


def _check_rand(op: str, rand: object, A: torch.Tensor, code: torch.Tensor) -> Optional[torch.Tensor]:
    """The uniform [0, 1) values stochastic rounding reads, as a flat float32 tensor on A's device.

    A ``torch.Generator`` draws one value per element. A tensor must hold one per element or
    at least :data:`MIN_CYCLIC_RAND` (read cyclically), all in [0, 1); the code must be
    sorted, since the rounding picks between neighbouring table entries.
    """
    if rand is None:
        return None
    if isinstance(rand, torch.Generator):
        rand = torch.rand(A.numel(), generator=rand, device=rand.device)
    rand = check_dtype(op, "rand", rand, (torch.float32,))
    n = rand.numel()
    if n != A.numel() and n < MIN_CYCLIC_RAND:
        raise KbitValueError(
            op, "rand.numel()", n, f"one value per element ({A.numel()}) or at least {MIN_CYCLIC_RAND}, read cyclically"
        )
    if n:
        low, high = torch.aminmax(rand.detach())
        if not (float(low) >= 0.0 and float(high) < 1.0):  # NaN fails both comparisons
            bad = float(low) if not float(low) >= 0.0 else float(high)
            raise KbitValueError(op, "rand", f"a value {bad}", "uniform values in [0, 1)")
    if code.numel() > 1 and not bool((code[1:] >= code[:-1]).all()):
        raise KbitValueError(op, "code", "an unsorted table", "a table sorted ascending for stochastic rounding")
    return rand.to(A.device).reshape(-1).contiguous()


def quantize_blockwise(
    A: torch.Tensor,
    code: Optional[torch.Tensor] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
    rand: Optional[torch.Tensor | torch.Generator] = None,
    *,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to 8-bit codes in blocks of ``blocksize`` consecutive elements.

    Args:
        A: float16, bfloat16 or float32 tensor of any shape (flattened row-major).
        code: 256-entry sorted float32 table; the signed dynamic map by default.
        absmax: optional float32 buffer of ``ceil(numel / blocksize)`` to receive the scales.
        out: optional uint8 buffer shaped like ``A`` to receive the codes.
        blocksize: a power of two in 64..4096, or 8192..65536 (served by the reference
            backend, as bitsandbytes serves them on CPU).
        nested: also quantize the absmax values (8-bit, blocks of 256, mean-centred).
        rand: stochastic rounding instead of nearest: float32 uniform [0, 1) values, one
            per element or at least 1024 read cyclically, or a ``torch.Generator`` to draw
            them from. Each value rounds to its lower or upper neighbouring code with
            probability proportional to its distance from the other, so dequantization is
            unbiased in expectation (``docs/formats.md`` section 2). The nested absmax is
            always rounded to nearest.
        backend: name of a backend to prefer for this call.

    Returns:
        ``(codes, quant_state)``: uint8 codes shaped like ``A`` and the :class:`QuantState`
        needed by :func:`dequantize_blockwise`.
    """
    op = "quantize_blockwise"
    check_dtype(op, "A", A, FLOAT_DTYPES)
    check_choice(op, "blocksize", blocksize, BLOCKSIZES_8BIT_ALL)
    code = _code_for(op, code, A.device, for_search=True)
    check_buffer(op, "out", out, A.shape, torch.uint8, A.device)
    check_buffer(op, "absmax", absmax, (num_blocks(A.numel(), blocksize),), torch.float32, A.device)
    rand = _check_rand(op, rand, A, code)
    codes, scales = call_with_backend(backend, ops.quantize_blockwise, A.contiguous(), code, blocksize, rand)
    codes = store_into(op, "out", codes, out)
    scales = store_into(op, "absmax", scales, absmax)
    if not nested:
        return codes, QuantState(scales, shape=A.shape, code=code, blocksize=blocksize, dtype=A.dtype)
    nested_codes, offset, state2 = nest_absmax(scales, backend)
    state = QuantState(
        nested_codes, shape=A.shape, code=code, blocksize=blocksize, dtype=A.dtype, offset=offset, state2=state2
    )
    return codes, state


def nest_absmax(scales: torch.Tensor, backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, QuantState]:
    """Compress float32 per-block scales (8-bit and 4-bit ``nested`` / ``compress_statistics``).

    Returns ``(codes, offset, state2)``: the scales minus ``offset`` quantized 8-bit in
    blocks of :data:`NESTED_BLOCKSIZE`. ``offset`` is the mean of the finite scales only
    (0 when there are none), so a block poisoned by NaN or inf spoils just the nested
    block holding its scale, not every scale through the mean.
    """
    finite = torch.isfinite(scales)
    # Masked sum / count rather than indexing: no data-dependent shape (torch.compile).
    offset = torch.where(finite, scales, 0.0).sum() / finite.sum().clamp(min=1)
    codes, state2 = quantize_blockwise(scales - offset, blocksize=NESTED_BLOCKSIZE, backend=backend)
    return codes, offset, state2


def _float_absmax(op: str, state: QuantState, backend: Optional[str]) -> torch.Tensor:
    """The float32 per-block scales of ``state``, undoing nesting if needed.

    A nested absmax is expanded once and kept on the state (:func:`_expanded_absmax`): a
    4-bit layer's forward needs the scales on every call, and expanding them cost more
    than the product itself at batch 1.
    """
    if state.nested:
        return _expanded_absmax(state, backend)
    absmax = check_tensor(op, "absmax", state.absmax)
    if not absmax.is_floating_point():
        raise QuantStateError("absmax", f"dtype {absmax.dtype} is not a float scale and the state is not nested", op=op)
    # Flattened: states stacked along a first axis (AdEMAMix's two first moments) keep a
    # (2, blocks) absmax whose blocks follow each other in the flattened codes.
    return absmax.to(torch.float32).reshape(-1).contiguous()


def _expanded_absmax(state: QuantState, backend: Optional[str]) -> torch.Tensor:
    """``dequantize_blockwise(absmax, state2) + offset`` for a nested ``state``, cached on it.

    The cache is derived data, recomputed whenever what it came from may have changed: it
    keeps each input tensor itself (a replaced tensor is another object) and its
    :func:`~kbit._ops.write_stamp`, and the nested blocksize, shape and dtype. Writes that
    bypass torch's version counter (through ``tensor.data`` or raw pointers) are not seen;
    change a state by assigning new tensors or writing in place. A state holding inference
    tensors (quantized under ``torch.inference_mode()``) has no version counters to key on
    and is expanded on every call instead. The scales are computed
    outside inference mode, so a cached value can also be saved for a backward pass later,
    and the cache is used only where an op call would run eagerly on plain tensors (not
    while compiling, tracing, or under a dispatch mode, where a cached real tensor must
    not stand in for a traced one). Float32 scales of a nested state take as much memory
    as a state that is not nested.
    """
    state2, offset = state.state2, state.offset
    tensors = (state.absmax, offset, state2.absmax, state2.code)
    # While compiling, dispatcher_needed answers before write_stamp is reached (dynamo
    # cannot trace is_inference); a state of inference tensors has no stamps (None).
    stamps = None
    if not dispatcher_needed(tensors) and backend is None:
        stamps = tuple(write_stamp(t) if isinstance(t, torch.Tensor) else (t,) for t in tensors)
    if stamps is None or None in stamps:
        return dequantize_blockwise(state.absmax, state2, backend=backend) + offset
    stamps += (state2.blocksize, state2.shape, state2.dtype)
    cached = state.__dict__.get(EXPANDED_ABSMAX)
    if cached is not None and cached[1] == stamps and all(a is b for a, b in zip(cached[0], tensors)):
        return cached[2]
    with torch.inference_mode(False), torch.no_grad():
        scales = dequantize_blockwise(state.absmax, state2) + offset
    state.__dict__[EXPANDED_ABSMAX] = (tensors, stamps, scales)
    return scales


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    code: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Dequantize 8-bit blockwise codes.

    Pass the ``quant_state`` returned by :func:`quantize_blockwise`, or ``absmax`` (plus
    optionally ``code`` and ``blocksize``) for a plain state. A stacked ``(rows, blocks)``
    absmax (AdEMAMix's two first moments) is read row by row: flattened when the rows
    fill whole blocks, each row on its own otherwise. The result has ``A``'s shape
    and the original dtype (``out.dtype`` when ``out`` is given, float32 when only
    ``absmax`` is known). ``nested`` is accepted for API compatibility; nesting is read
    from the state.
    """
    op = "dequantize_blockwise"
    check_codes(op, "A", A, (torch.uint8,))
    given = quant_state is None
    if quant_state is None:
        if absmax is None:
            raise KbitValueError(op, "quant_state", None, "pass quant_state, or absmax for a plain state")
        check_choice(op, "blocksize", blocksize, BLOCKSIZES_8BIT_ALL)
        quant_state = QuantState(absmax, shape=A.shape, code=code, blocksize=blocksize, dtype=torch.float32)
    check_choice(op, "quant_state.blocksize", quant_state.blocksize, BLOCKSIZES_8BIT_ALL)
    if quant_state.shape is not None:
        check_payload_numel(op, "A", A, quant_state.shape.numel(), f"quant_state.shape {tuple(quant_state.shape)}")
    if _blocks_per_row(A, quant_state):
        # Rows of whole blocks are one stream of blocks; ragged rows each start a block.
        rows = [dequantize_blockwise(row, _row_state(quant_state, i, row), backend=backend) for i, row in enumerate(A)]
        dtype = out.dtype if out is not None else rows[0].dtype
        return store_into(op, "out", torch.stack(rows).to(dtype), out)
    scales = _float_absmax(op, quant_state, backend)
    check_payload_numel(
        op, "absmax", scales, num_blocks(A.numel(), quant_state.blocksize), f"blocksize {quant_state.blocksize}"
    )
    dtype = out.dtype if out is not None else (quant_state.dtype or torch.float32)
    check_choice(op, "dtype", dtype, FLOAT_DTYPES)
    table = _code_for(op, quant_state.code, A.device, given=given)
    result = call_with_backend(
        backend, ops.dequantize_blockwise, A.contiguous(), scales.to(A.device), table, quant_state.blocksize, dtype
    )
    return store_into(op, "out", result, out)


def _blocks_per_row(A: torch.Tensor, state: QuantState) -> bool:
    """Whether ``state`` holds a stacked ``(rows, blocks per row)`` absmax of rows that do not
    fill whole blocks (so each row of ``A`` must be dequantized on its own)."""
    absmax = state.absmax
    if state.nested or not isinstance(absmax, torch.Tensor) or absmax.dim() != 2 or A.dim() < 2:
        return False
    row_numel = A[0].numel() if A.shape[0] else 0
    return (
        A.shape[0] == absmax.shape[0]
        and row_numel % state.blocksize != 0
        and absmax.shape[1] == num_blocks(row_numel, state.blocksize)
    )


def _row_state(state: QuantState, index: int, row: torch.Tensor) -> QuantState:
    return QuantState(state.absmax[index], shape=row.shape, code=state.code, blocksize=state.blocksize, dtype=state.dtype)


def quantize(
    A: torch.Tensor, code: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None, *, backend: Optional[str] = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Whole-tensor 8-bit quantization with a single absmax.

    Returns ``(codes, (absmax, code))``, the seed API's state tuple.
    """
    op = "quantize"
    check_dtype(op, "A", A, FLOAT_DTYPES)
    code = _code_for(op, code, A.device, for_search=True)
    codes, absmax = call_with_backend(backend, ops.quantize, A.contiguous(), code)
    return store_into(op, "out", codes, out), (absmax, code)


def dequantize(
    A: torch.Tensor,
    quant_state: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    absmax: Optional[torch.Tensor] = None,
    code: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize`; returns float32 (or ``out``'s dtype)."""
    op = "dequantize"
    check_codes(op, "A", A, (torch.uint8,))
    given = quant_state is None
    if quant_state is not None:
        absmax, code = quant_state
    if absmax is None:
        raise KbitValueError(op, "quant_state", None, "pass quant_state=(absmax, code) or absmax")
    check_dtype(op, "absmax", absmax, FLOAT_DTYPES)
    check_payload_numel(op, "absmax", absmax, 1, "whole-tensor quantization")
    dtype = out.dtype if out is not None else torch.float32
    check_choice(op, "dtype", dtype, FLOAT_DTYPES)
    table = _code_for(op, code, A.device, given=given)
    result = call_with_backend(
        backend, ops.dequantize, A.contiguous(), absmax.to(A.device, torch.float32).reshape(1), table, dtype
    )
    return store_into(op, "out", result, out)


def quantize_no_absmax(
    A: torch.Tensor, code: torch.Tensor, out: Optional[torch.Tensor] = None, *, backend: Optional[str] = None
) -> torch.Tensor:
    """Map values already scaled to the code's range to the nearest code index (uint8).

    Out-of-range values saturate to the nearest end of the table (±inf too); NaN maps to
    the index of the largest code value (``docs/formats.md`` section 2).
    """
    op = "quantize_no_absmax"
    check_dtype(op, "A", A, FLOAT_DTYPES)
    table = check_code(op, code, inspect_values=True, for_search=True).to(A.device)
    result = call_with_backend(backend, ops.quantize_no_absmax, A.contiguous(), table)
    return store_into(op, "out", result, out)


def dequantize_no_absmax(
    A: torch.Tensor, code: torch.Tensor, out: Optional[torch.Tensor] = None, *, backend: Optional[str] = None
) -> torch.Tensor:
    """Look codes up in ``code``; float32 (or ``out``'s dtype)."""
    op = "dequantize_no_absmax"
    check_dtype(op, "A", A, (torch.uint8,))
    table = check_code(op, code, inspect_values=True).to(A.device)
    dtype = out.dtype if out is not None else torch.float32
    check_choice(op, "dtype", dtype, FLOAT_DTYPES)
    result = call_with_backend(backend, ops.dequantize_no_absmax, A.contiguous(), table, dtype)
    return store_into(op, "out", result, out)


def estimate_quantiles(
    A: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    offset: float = 1 / 512,
    num_quantiles: int = 256,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``num_quantiles`` equidistant quantiles of ``A`` from ``offset`` to ``1 - offset``.

    Quantiles are exact (linear interpolation between order statistics), float32.
    """
    op = "estimate_quantiles"
    check_dtype(op, "A", A, FLOAT_DTYPES)
    if A.numel() == 0:
        raise KbitValueError(op, "A.numel()", 0, "quantiles of an empty tensor are undefined")
    check_int(op, "num_quantiles", num_quantiles, low=1, high=256)
    offset = check_real(op, "offset", offset, low=0.0, high=0.5, high_open=True)
    result = call_with_backend(backend, ops.estimate_quantiles, A.contiguous(), offset, num_quantiles)
    return store_into(op, "out", result, out)


def histogram_scatter_add_2d(
    histogram: torch.Tensor,
    index1: torch.Tensor,
    index2: torch.Tensor,
    source: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> None:
    """In place: ``histogram[index1[i], index2[i]] += source[i]`` for every ``i``.

    ``histogram`` is a 2-D float32 tensor; indices are integer tensors with as many
    elements as ``source``. Out-of-range indices raise instead of writing out of bounds.
    """
    op = "histogram_scatter_add_2d"
    check_dtype(op, "histogram", histogram, (torch.float32,))
    if histogram.dim() != 2:
        raise KbitValueError(op, "histogram.dim()", histogram.dim(), "expected a 2-D tensor")
    if not histogram.is_contiguous():
        raise KbitValueError(op, "histogram", "a non-contiguous tensor", "expected a contiguous tensor (updated in place)")
    integer_dtypes = (torch.int32, torch.int64, torch.int16, torch.uint8)
    check_dtype(op, "index1", index1, integer_dtypes)
    check_dtype(op, "index2", index2, integer_dtypes)
    check_dtype(op, "source", source, (torch.float32,))
    check_numel(op, "index1", index1, source.numel())
    check_numel(op, "index2", index2, source.numel())
    for name, index, size in (("index1", index1, histogram.shape[0]), ("index2", index2, histogram.shape[1])):
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
            bad = int(index.min()) if int(index.min()) < 0 else int(index.max())
            raise KbitValueError(op, name, bad, f"indices must lie in 0..{size - 1}")
    device = histogram.device
    call_with_backend(
        backend,
        ops.histogram_scatter_add_2d,
        histogram,
        index1.to(device).reshape(-1).contiguous(),
        index2.to(device).reshape(-1).contiguous(),
        source.to(device).reshape(-1).contiguous(),
    )
