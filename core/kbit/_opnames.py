"""Canonical op names, grouped by family.

One name per :class:`kbit.backend.Backend` method and per ``torch.ops.kbit`` custom op. The
manifest validator rejects names outside this table, so a typo in a plugin's manifest is
caught at discovery instead of silently never matching.
"""

from __future__ import annotations

__all__ = ["OP_FAMILIES", "ALL_OPS", "family_of"]

OP_FAMILIES: dict[str, tuple[str, ...]] = {
    "blockwise8": (
        "quantize_blockwise",
        "dequantize_blockwise",
        "quantize",
        "dequantize",
        "quantize_no_absmax",
        "dequantize_no_absmax",
        "estimate_quantiles",
        "histogram_scatter_add_2d",
    ),
    "quant4": (
        "quantize_4bit",
        "dequantize_4bit",
        "gemv_4bit",
        "matmul_4bit",
    ),
    "int8": (
        "int8_vectorwise_quant",
        "int8_vectorwise_dequant",
        "int8_linear_matmul",
        "int8_mm_dequant",
        "int8_double_quant",
        "int8_mixed_scaled_mm",
    ),
    "optimizer": (
        "optimizer_update_32bit",
        "optimizer_update_8bit",
        "optimizer_update_8bit_blockwise",
        "percentile_clipping",
    ),
}

ALL_OPS: frozenset[str] = frozenset(op for ops in OP_FAMILIES.values() for op in ops)


def family_of(op: str) -> str:
    """Return the family an op belongs to (``KeyError`` for an unknown op)."""
    for family, ops in OP_FAMILIES.items():
        if op in ops:
            return family
    raise KeyError(op)
