"""Manifest of the reference backend (what ``kbit.backends`` loads at discovery)."""

from kbit.backend import API_VERSION, BackendManifest, OpSupport
from kbit.functional._optim import OPTIMIZER_KINDS as _KINDS

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)

_blockwise8 = {
    "quantize_blockwise": OpSupport(dtypes=FLOAT_DTYPES, blocksizes=BLOCKSIZES_8BIT),
    "dequantize_blockwise": OpSupport(dtypes=FLOAT_DTYPES, blocksizes=BLOCKSIZES_8BIT),
    "quantize": OpSupport(dtypes=FLOAT_DTYPES),
    "dequantize": OpSupport(dtypes=FLOAT_DTYPES),
    "quantize_no_absmax": OpSupport(dtypes=FLOAT_DTYPES),
    "dequantize_no_absmax": OpSupport(dtypes=FLOAT_DTYPES),
    "estimate_quantiles": OpSupport(dtypes=FLOAT_DTYPES),
    "histogram_scatter_add_2d": OpSupport(dtypes=("float32",)),
}

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_quant4_support = OpSupport(
    dtypes=FLOAT_DTYPES,
    blocksizes=BLOCKSIZES_4BIT,
    quant_types=("nf4", "fp4"),
    quant_storages=("uint8", "float16", "bfloat16", "float32"),
)
_quant4 = {op: _quant4_support for op in ("quantize_4bit", "dequantize_4bit", "gemv_4bit", "matmul_4bit")}

_int8 = {
    "int8_vectorwise_quant": OpSupport(dtypes=FLOAT_DTYPES),
    "int8_vectorwise_dequant": OpSupport(dtypes=("float32",)),
    "int8_linear_matmul": OpSupport(dtypes=("int8",)),
    "int8_mm_dequant": OpSupport(dtypes=FLOAT_DTYPES),
    "int8_double_quant": OpSupport(dtypes=FLOAT_DTYPES),
    "int8_mixed_scaled_mm": OpSupport(dtypes=FLOAT_DTYPES),
}

# The reference serves every kind kbit defines: one table, no second list to keep in step.
OPTIMIZER_KINDS = tuple(_KINDS)
# Whole-tensor 8-bit state has no slot for AdEMAMix's beta3 / alpha (seed API), so that op
# serves only the kinds the table marks static_8bit (every kind except ademamix).
STATIC_8BIT_KINDS = tuple(name for name, kind in _KINDS.items() if kind.static_8bit)

_optimizer = {
    "optimizer_update_32bit": OpSupport(dtypes=FLOAT_DTYPES, optimizers=OPTIMIZER_KINDS),
    "optimizer_update_8bit": OpSupport(dtypes=FLOAT_DTYPES, optimizers=STATIC_8BIT_KINDS),
    "optimizer_update_8bit_blockwise": OpSupport(dtypes=FLOAT_DTYPES, optimizers=OPTIMIZER_KINDS),
    "percentile_clipping": OpSupport(dtypes=FLOAT_DTYPES),
}

MANIFEST = BackendManifest(
    name="reference",
    api_version=API_VERSION,
    # Lowest priority: any native backend for a device wins; the reference also serves
    # every other device type as the fallback (see KBIT_FALLBACK).
    priority=0,
    device_types=("cpu",),
    factory="kbit_reference.backend:ReferenceBackend",
    ops={**_blockwise8, **_quant4, **_int8, **_optimizer},
    description="pure PyTorch; the correctness oracle and universal fallback",
)
