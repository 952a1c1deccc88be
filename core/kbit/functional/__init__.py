"""Quantization functions with the bitsandbytes ``functional`` API.

``import kbit.functional as F`` gives the same names, signatures and defaults as
``bitsandbytes.functional``. Every function validates its arguments once, then calls a
``torch.ops.kbit`` custom op whose kernel is served by the best backend for the tensor's
device (see :mod:`kbit.backends`). Functions that compute accept a keyword-only
``backend=`` naming a backend to prefer for that call.
"""

from ._blockwise import (
    dequantize,
    dequantize_blockwise,
    dequantize_no_absmax,
    estimate_quantiles,
    histogram_scatter_add_2d,
    quantize,
    quantize_blockwise,
    quantize_no_absmax,
)
from ._codebooks import (
    create_dynamic_map,
    create_fp8_map,
    create_linear_map,
    create_normal_map,
    get_4bit_type,
)
from ._int8 import (
    int8_double_quant,
    int8_linear_matmul,
    int8_mm_dequant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
)
from ._optim import (
    optimizer_update_8bit,
    optimizer_update_8bit_blockwise,
    optimizer_update_32bit,
    percentile_clipping,
)
from ._quant4 import (
    dequantize_4bit,
    dequantize_fp4,
    dequantize_nf4,
    gemv_4bit,
    quantize_4bit,
    quantize_fp4,
    quantize_nf4,
)
from ._quant_state import QuantState
from ._utils import get_paged, get_ptr, has_avx512bf16, is_on_gpu, pack_dict_to_tensor, unpack_tensor_to_dict

__all__ = [
    "QuantState",
    "create_dynamic_map",
    "create_fp8_map",
    "create_linear_map",
    "create_normal_map",
    "dequantize",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_fp4",
    "dequantize_nf4",
    "dequantize_no_absmax",
    "estimate_quantiles",
    "gemv_4bit",
    "get_4bit_type",
    "get_paged",
    "get_ptr",
    "has_avx512bf16",
    "histogram_scatter_add_2d",
    "int8_double_quant",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
    "is_on_gpu",
    "optimizer_update_32bit",
    "optimizer_update_8bit",
    "optimizer_update_8bit_blockwise",
    "pack_dict_to_tensor",
    "percentile_clipping",
    "quantize",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_nf4",
    "quantize_no_absmax",
    "unpack_tensor_to_dict",
]
