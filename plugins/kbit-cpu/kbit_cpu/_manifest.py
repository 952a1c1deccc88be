"""What the native CPU backend serves, declared before anything heavy is imported.

kbit loads this module at discovery: it imports no torch op, opens no library. The
priority (20) ranks the backend above the reference (0) and the NumPy template (10) on
CPU, so once installed it serves every op it declares; the rest (``estimate_quantiles``,
``histogram_scatter_add_2d``, the int8 matmuls, ``percentile_clipping``) stays with the
reference. Optimizer kinds are read from kbit's kind table, so a kind kbit adds is not
claimed until this backend implements it (``_KIND_CODES`` in backend.py).
"""

from kbit._formats import (
    BLOCKSIZES_4BIT,
    BLOCKSIZES_8BIT,
    FLOAT_DTYPE_NAMES,
    QUANT_STORAGE_NAMES_4BIT,
    QUANT_TYPES_4BIT,
)
from kbit._manifest import ROUNDINGS
from kbit.backend import API_VERSION, OPTIMIZER_KINDS, BackendManifest, OpSupport

#: The kinds the C kernels implement, in the order of their codes (csrc/kbit_cpu.h, KB_OPT_*).
KINDS = ("adam", "momentum", "rmsprop", "lion", "adagrad", "lamb", "lars", "ademamix")
_SERVED = tuple(name for name in OPTIMIZER_KINDS if name in KINDS)
_STATIC_8BIT = tuple(name for name in _SERVED if OPTIMIZER_KINDS[name].static_8bit)

_QUANT4 = OpSupport(
    dtypes=FLOAT_DTYPE_NAMES,
    blocksizes=BLOCKSIZES_4BIT,
    quant_types=QUANT_TYPES_4BIT,
    quant_storages=QUANT_STORAGE_NAMES_4BIT,
)

MANIFEST = BackendManifest(
    name="cpu",
    api_version=API_VERSION,
    priority=20,
    device_types=("cpu",),
    factory="kbit_cpu.backend:CpuBackend",
    ops={
        "quantize_blockwise": OpSupport(dtypes=FLOAT_DTYPE_NAMES, blocksizes=BLOCKSIZES_8BIT, roundings=ROUNDINGS),
        "dequantize_blockwise": OpSupport(dtypes=FLOAT_DTYPE_NAMES, blocksizes=BLOCKSIZES_8BIT),
        "quantize": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
        "dequantize": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
        "quantize_no_absmax": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
        "dequantize_no_absmax": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
        "quantize_4bit": _QUANT4,
        "dequantize_4bit": _QUANT4,
        "gemv_4bit": _QUANT4,
        "matmul_4bit": _QUANT4,
        "int8_vectorwise_quant": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
        "int8_vectorwise_dequant": OpSupport(dtypes=("float32",)),
        "int8_mm_dequant": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
        "optimizer_update_32bit": OpSupport(dtypes=FLOAT_DTYPE_NAMES, optimizers=_SERVED),
        "optimizer_update_8bit": OpSupport(dtypes=FLOAT_DTYPE_NAMES, optimizers=_STATIC_8BIT),
        "optimizer_update_8bit_blockwise": OpSupport(dtypes=FLOAT_DTYPE_NAMES, optimizers=_SERVED),
    },
    description="native C kernels (OpenMP; AVX-512 / AVX2 / portable, chosen at run time)",
)
