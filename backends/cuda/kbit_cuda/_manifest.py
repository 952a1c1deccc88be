"""Manifest of the CUDA backend: exactly the ops and variants its kernels implement.

With ``KBIT_CUDA_EMULATE=1`` the backend also declares the ``cpu`` device type: CPU
tensors then run the same kernels in the CPU emulator (for the conformance suite and
tests; slow). Reading that variable is the only work done here.
"""

import os

from kbit._formats import (
    BLOCKSIZES_4BIT,
    BLOCKSIZES_8BIT,
    FLOAT_DTYPE_NAMES,
    QUANT_STORAGE_NAMES_4BIT,
    QUANT_TYPES_4BIT,
)
from kbit._manifest import ROUNDINGS
from kbit.backend import API_VERSION, OPTIMIZER_KINDS, BackendManifest, OpSupport

# Read when the registry discovers backends (kbit_cuda._launch.emulation_enabled reads
# the same variable when kernels run; the manifest stays free of the launch layer's imports).
_EMULATE = os.environ.get("KBIT_CUDA_EMULATE", "").strip() == "1"

_blockwise8 = {
    # Nearest and stochastic rounding (contract v2's rand=).
    "quantize_blockwise": OpSupport(dtypes=FLOAT_DTYPE_NAMES, blocksizes=BLOCKSIZES_8BIT, roundings=ROUNDINGS),
    "dequantize_blockwise": OpSupport(dtypes=FLOAT_DTYPE_NAMES, blocksizes=BLOCKSIZES_8BIT),
    "quantize": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "dequantize": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "quantize_no_absmax": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "dequantize_no_absmax": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
}

_quant4_support = OpSupport(
    dtypes=FLOAT_DTYPE_NAMES,
    blocksizes=BLOCKSIZES_4BIT,
    quant_types=QUANT_TYPES_4BIT,
    quant_storages=QUANT_STORAGE_NAMES_4BIT,
)
_quant4 = {op: _quant4_support for op in ("quantize_4bit", "dequantize_4bit", "gemv_4bit", "matmul_4bit")}

# int8_linear_matmul and int8_mixed_scaled_mm are integer GEMMs: left to the reference
# backend's torch._int_mm path (cuBLAS on a GPU), so not declared.
_int8 = {
    "int8_vectorwise_quant": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "int8_vectorwise_dequant": OpSupport(dtypes=("float32",)),
    "int8_mm_dequant": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
    "int8_double_quant": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
}

# Every kind of the table (kbit_cuda._optim.RULES gives each its kernel rule; a test keeps
# the two in step); whole-tensor 8-bit state only for the kinds it can hold.
_ALL_KINDS = tuple(OPTIMIZER_KINDS)
_STATIC_8BIT_KINDS = tuple(name for name, kind in OPTIMIZER_KINDS.items() if kind.static_8bit)
_optimizer = {
    "optimizer_update_32bit": OpSupport(dtypes=FLOAT_DTYPE_NAMES, optimizers=_ALL_KINDS),
    "optimizer_update_8bit": OpSupport(dtypes=FLOAT_DTYPE_NAMES, optimizers=_STATIC_8BIT_KINDS),
    "optimizer_update_8bit_blockwise": OpSupport(dtypes=FLOAT_DTYPE_NAMES, optimizers=_ALL_KINDS),
    "percentile_clipping": OpSupport(dtypes=FLOAT_DTYPE_NAMES),
}



def build_manifest(emulate: bool) -> BackendManifest:
    """The CUDA manifest; with ``emulate`` it also serves the ``cpu`` device type (the
    kernels run in the CPU emulator), which is what ``KBIT_CUDA_EMULATE=1`` selects."""
    return BackendManifest(
        name="cuda",
        api_version=API_VERSION,
        priority=100,
        device_types=("cuda", "cpu") if emulate else ("cuda",),
        factory="kbit_cuda.backend:CudaBackend",
        ops={**_blockwise8, **_quant4, **_int8, **_optimizer},
        description="CuPy RawKernels compiled with NVRTC" + (" (CPU tensors: emulated, KBIT_CUDA_EMULATE=1)" if emulate else ""),
    )


MANIFEST = build_manifest(_EMULATE)
