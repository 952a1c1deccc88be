"""Manifest of the reference backend (what ``kbit.backends`` loads at discovery).

The reference declares the whole format (``kbit._formats``): every dtype, blocksize, quant
type and storage the public API accepts, so it can serve as the oracle for all of them.
"""

from kbit._formats import (
    BLOCKSIZES_4BIT,
    BLOCKSIZES_8BIT_ALL,
    FLOAT_DTYPE_NAMES,
    QUANT_STORAGE_NAMES_4BIT,
    QUANT_TYPES_4BIT,
)
from kbit._manifest import ROUNDINGS
from kbit.backend import API_VERSION, OPTIMIZER_KINDS, BackendManifest, OpSupport

_blockwise8 = {
    "quantize_blockwise": OpSupport(dtypes=FLOAT_DTYPE_NAMES, blocksizes=BLOCKSIZES_8BIT_ALL, roundings=ROUNDINGS),
    "dequantize_blockwise": OpSupport(dtypes=FLOAT_DTYPE_NAMES, blocksizes=BLOCKSIZES_8BIT_ALL),
    "quantize": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "dequantize": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "quantize_no_absmax": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "dequantize_no_absmax": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "estimate_quantiles": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "histogram_scatter_add_2d": OpSupport(dtypes=("float32",)),
}

_quant4_support = OpSupport(
    dtypes=FLOAT_DTYPE_NAMES,
    blocksizes=BLOCKSIZES_4BIT,
    quant_types=QUANT_TYPES_4BIT,
    quant_storages=QUANT_STORAGE_NAMES_4BIT,
)
_quant4 = {op: _quant4_support for op in ("quantize_4bit", "dequantize_4bit", "gemv_4bit", "matmul_4bit")}

_int8 = {
    "int8_vectorwise_quant": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "int8_vectorwise_dequant": OpSupport(dtypes=("float32",)),
    "int8_linear_matmul": OpSupport(dtypes=("int8",)),
    "int8_mm_dequant": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "int8_double_quant": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "int8_mixed_scaled_mm": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
}

# The reference serves every kind kbit defines: one table, no second list to keep in step.
ALL_KINDS = tuple(OPTIMIZER_KINDS)
# Whole-tensor 8-bit state has no slot for AdEMAMix's beta3 / alpha (seed API), so that op
# serves only the kinds the table marks static_8bit (every kind except ademamix).
STATIC_8BIT_KINDS = tuple(name for name, kind in OPTIMIZER_KINDS.items() if kind.static_8bit)

_optimizer = {
    "optimizer_update_32bit": OpSupport(dtypes=FLOAT_DTYPE_NAMES, optimizers=ALL_KINDS),
    "optimizer_update_8bit": OpSupport(dtypes=FLOAT_DTYPE_NAMES, optimizers=STATIC_8BIT_KINDS),
    "optimizer_update_8bit_blockwise": OpSupport(dtypes=FLOAT_DTYPE_NAMES, optimizers=ALL_KINDS),
    "percentile_clipping": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
}

MANIFEST = BackendManifest(
    name="reference",
    api_version=API_VERSION,
    # Lowest priority: any native backend for a device wins. Being pure PyTorch it computes
    # on any device PyTorch supports, but it is the native choice only on CPU; on every
    # other device type it serves as the fallback, with a KbitFallbackWarning that tells the
    # user no native backend took the call (and KBIT_FALLBACK=error turns that off).
    priority=0,
    device_types=("cpu",),
    factory="kbit_reference.backend:ReferenceBackend",
    ops={**_blockwise8, **_quant4, **_int8, **_optimizer},
    description="pure PyTorch: native on CPU and the fallback on any other device; the correctness oracle",
)
