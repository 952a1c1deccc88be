"""``torch.ops.bitsandbytes``: bitsandbytes' op schemas, served by kbit.

Code that calls these ops directly (``torch.ops.bitsandbytes.quantize_4bit(...)``) or
registers its own kernel for a device (``torch.library.register_kernel(
"bitsandbytes::gemm_4bit", "xpu")``) keeps working. Each op is defined with the schema of
the bitsandbytes op of the same name; its default kernel (``CompositeExplicitAutograd``, so
a kernel registered for a device type takes precedence there) calls the kbit function
that validates the arguments and dispatches to kbit's backends. Fake implementations give
``torch.compile`` the shapes kbit produces.

kbit differs from bitsandbytes in two places here, both deliberate (docs/ecosystem.md):
packed 4-bit data whose byte count is not a multiple of the storage element size gets one
zero-padded element more instead of losing bytes, and ``optimizer_update_32bit`` ignores
``param_norm``, computing the norm itself when ``max_unorm > 0``. As in bitsandbytes, the
optimizer ops ignore hyperparameters the optimizer kind does not read.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import kbit
import kbit.functional as F
from kbit.backend import OPTIMIZER_KINDS
from kbit._ops import int8 as _kbit_int8
from kbit._ops.quant4 import packed_rows
from kbit.functional import QuantState

__all__ = ["LIBRARY", "SCHEMAS"]

Tensor = torch.Tensor

#: Op name -> schema, as bitsandbytes defines them (the ``.out`` overloads included).
SCHEMAS = {
    "quantize_4bit": "(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> (Tensor, Tensor)",
    "dequantize_4bit": "(Tensor A, Tensor absmax, int blocksize, str quant_type, int[] shape, ScalarType dtype) -> Tensor",
    "dequantize_4bit.out": "(Tensor A, Tensor absmax, int blocksize, str quant_type, int[] shape, ScalarType dtype, "
    "Tensor! out) -> ()",
    "gemv_4bit": "(Tensor A, Tensor B, int[] shapeB, Tensor absmax, Tensor code, int blocksize) -> Tensor",
    "gemv_4bit.out": "(Tensor A, Tensor B, int[] shapeB, Tensor absmax, Tensor code, int blocksize, Tensor! out) -> ()",
    "gemm_4bit": "(Tensor A, Tensor B, int[] shapeB, Tensor absmax, int blocksize, str quant_type, Tensor? bias=None, "
    "Tensor? absmax_8bit=None, Tensor? absmax_code=None, Tensor? absmax_offset=None) -> Tensor",
    "quantize_blockwise": "(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    "dequantize_blockwise": "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
    "dequantize_blockwise.out": "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype, Tensor! out) -> ()",
    "int8_linear_matmul": "(Tensor A, Tensor B) -> Tensor",
    "int8_linear_matmul.out": "(Tensor A, Tensor B, Tensor! out) -> ()",
    "int8_vectorwise_quant": "(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor?)",
    "int8_vectorwise_dequant": "(Tensor A, Tensor stats) -> Tensor",
    "int8_mm_dequant": "(Tensor A, Tensor row_stats, Tensor col_stats, ScalarType? dtype=None, Tensor? bias=None) -> Tensor",
    "int8_scaled_mm": "(Tensor A, Tensor B, Tensor row_stats, Tensor col_stats, Tensor? bias=None, "
    "ScalarType? dtype=None) -> Tensor",
    "int8_mixed_scaled_mm": "(Tensor A, Tensor CA, Tensor CB, Tensor SCA, Tensor SCB, Tensor? outlier_cols=None, "
    "Tensor? bias=None) -> (Tensor, Tensor?)",
    "int8_double_quant": "(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor?)",
    "optimizer_update_32bit": "(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, Tensor(a2!) state1, "
    "Tensor(a3!)? state2, Tensor(a4!)? unorm_vec, float max_unorm, float param_norm, float beta1, float beta2, "
    "float beta3, float alpha, float eps, float weight_decay, int step, float lr, float gnorm_scale, "
    "bool skip_zeros=False) -> ()",
    "optimizer_update_8bit_blockwise": "(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, Tensor(a2!) state1, "
    "Tensor(a3!)? state2, float beta1, float beta2, float beta3, float alpha, float eps, int step, float lr, "
    "Tensor(a4!) qmap1, Tensor(a5!)? qmap2, Tensor(a6!) absmax1, Tensor(a7!)? absmax2, float weight_decay, "
    "float gnorm_scale, bool skip_zeros=False) -> ()",
}

#: The library holding the definitions (kept alive for the life of the process).
LIBRARY = torch.library.Library("bitsandbytes", "DEF")
for _name, _schema in SCHEMAS.items():
    LIBRARY.define(_name + _schema)


def _kernel(name: str):
    """Register the decorated function as the device-independent kernel of ``bitsandbytes::name``."""
    return torch.library.register_kernel(f"bitsandbytes::{name}", None, lib=LIBRARY)


def _fake(name: str):
    return torch.library.register_fake(f"bitsandbytes::{name}", lib=LIBRARY)


def _quant_type_of(code: Tensor) -> str:
    """The 4-bit type whose value table ``code`` holds (the gemv op passes the table)."""
    for quant_type in ("nf4", "fp4"):
        table = F.get_4bit_type(quant_type, device=code.device)
        if code.numel() == table.numel() and bool((code.to(torch.float32).reshape(-1) == table).all()):
            return quant_type
    raise kbit.KbitValueError("gemv_4bit", "code", "a table that is neither NF4 nor FP4", "the nf4 or fp4 value table")


def _state_4bit(absmax: Tensor, shape: Sequence[int], blocksize: int, quant_type: str, dtype) -> QuantState:
    return QuantState(absmax, shape=tuple(shape), blocksize=blocksize, quant_type=quant_type, dtype=dtype)


# -- 4-bit ----------------------------------------------------------------------------------


@_kernel("quantize_4bit")
def _(A: Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype) -> tuple[Tensor, Tensor]:
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, quant_storage=quant_storage)
    return packed, state.absmax


@_fake("quantize_4bit")
def _(A: Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype) -> tuple[Tensor, Tensor]:
    blocks = -(-A.numel() // blocksize)
    return A.new_empty((packed_rows(A.numel(), quant_storage), 1), dtype=quant_storage), A.new_empty(
        (blocks,), dtype=torch.float32
    )


def _dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype) -> Tensor:
    return F.dequantize_4bit(A.reshape(-1, 1), _state_4bit(absmax, shape, blocksize, quant_type, dtype))


@_kernel("dequantize_4bit")
def _(A, absmax, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    return _dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)


@_fake("dequantize_4bit")
def _(A, absmax, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    return A.new_empty(tuple(shape), dtype=dtype)


@_kernel("dequantize_4bit.out")
def _(A, absmax, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype, out: Tensor) -> None:
    out.copy_(_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype))


@_fake("dequantize_4bit.out")
def _(A, absmax, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype, out: Tensor) -> None:
    return None


def _gemv_4bit(A, B, shapeB, absmax, code, blocksize) -> Tensor:
    state = _state_4bit(absmax, shapeB, blocksize, _quant_type_of(code), A.dtype)
    return F.gemv_4bit(A, B, state=state)


@_kernel("gemv_4bit")
def _(A, B, shapeB: Sequence[int], absmax, code, blocksize: int) -> Tensor:
    return _gemv_4bit(A, B, shapeB, absmax, code, blocksize)


@_fake("gemv_4bit")
def _(A, B, shapeB: Sequence[int], absmax, code, blocksize: int) -> Tensor:
    return A.new_empty((*A.shape[:-1], shapeB[0]))


@_kernel("gemv_4bit.out")
def _(A, B, shapeB: Sequence[int], absmax, code, blocksize: int, out: Tensor) -> None:
    out.copy_(_gemv_4bit(A, B, shapeB, absmax, code, blocksize))


@_fake("gemv_4bit.out")
def _(A, B, shapeB: Sequence[int], absmax, code, blocksize: int, out: Tensor) -> None:
    return None


def _gemm_state(A, shapeB, absmax, blocksize, quant_type, absmax_8bit, absmax_code, absmax_offset) -> QuantState:
    """The weight's state; with ``absmax_8bit`` the scales are nested (``absmax`` is then theirs)."""
    if absmax_8bit is None:
        return _state_4bit(absmax, shapeB, blocksize, quant_type, A.dtype)
    nested = QuantState(absmax, shape=absmax_8bit.shape, code=absmax_code, blocksize=256, dtype=torch.float32)
    state = _state_4bit(absmax_8bit, shapeB, blocksize, quant_type, A.dtype)
    state.offset, state.state2 = absmax_offset, nested
    return state


@_kernel("gemm_4bit")
def _(A, B, shapeB: Sequence[int], absmax, blocksize: int, quant_type: str, bias=None, absmax_8bit=None,
      absmax_code=None, absmax_offset=None) -> Tensor:  # fmt: skip
    state = _gemm_state(A, shapeB, absmax, blocksize, quant_type, absmax_8bit, absmax_code, absmax_offset)
    return kbit.matmul_4bit(A, B.reshape(-1, 1), state, bias=bias)


@_fake("gemm_4bit")
def _(A, B, shapeB: Sequence[int], absmax, blocksize: int, quant_type: str, bias=None, absmax_8bit=None,
      absmax_code=None, absmax_offset=None) -> Tensor:  # fmt: skip
    return A.new_empty((*A.shape[:-1], shapeB[0]))


def _gemm_setup(ctx, inputs, output) -> None:
    A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset = (
        *inputs,
        *([None] * (10 - len(inputs))),
    )
    ctx.save_for_backward(B, absmax, absmax_8bit, absmax_code, absmax_offset)
    ctx.shapeB, ctx.blocksize, ctx.quant_type = list(shapeB), blocksize, quant_type
    ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype


def _gemm_backward(ctx, grad):
    # Gradients reach A and the bias; the packed weight and its scales are constants.
    B, absmax, absmax_8bit, absmax_code, absmax_offset = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        state = _gemm_state(grad, ctx.shapeB, absmax, ctx.blocksize, ctx.quant_type, absmax_8bit, absmax_code,
                            absmax_offset)  # fmt: skip
        grad_A = grad @ F.dequantize_4bit(B.reshape(-1, 1), state)
    if ctx.has_bias and ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_A, None, None, None, None, None, grad_bias, None, None, None


torch.library.register_autograd("bitsandbytes::gemm_4bit", _gemm_backward, setup_context=_gemm_setup, lib=LIBRARY)


# -- 8-bit blockwise ------------------------------------------------------------------------


@_kernel("quantize_blockwise")
def _(A, code, blocksize: int) -> tuple[Tensor, Tensor]:
    codes, state = F.quantize_blockwise(A, code=code, blocksize=blocksize)
    return codes, state.absmax


@_fake("quantize_blockwise")
def _(A, code, blocksize: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(A, dtype=torch.uint8), A.new_empty((-(-A.numel() // blocksize),), dtype=torch.float32)


def _dequantize_blockwise(A, absmax, code, blocksize, dtype) -> Tensor:
    state = QuantState(absmax, shape=A.shape, code=code, blocksize=blocksize, dtype=dtype)
    return F.dequantize_blockwise(A, state)


@_kernel("dequantize_blockwise")
def _(A, absmax, code, blocksize: int, dtype: torch.dtype) -> Tensor:
    return _dequantize_blockwise(A, absmax, code, blocksize, dtype)


@_fake("dequantize_blockwise")
def _(A, absmax, code, blocksize: int, dtype: torch.dtype) -> Tensor:
    return torch.empty_like(A, dtype=dtype)


@_kernel("dequantize_blockwise.out")
def _(A, absmax, code, blocksize: int, dtype: torch.dtype, out: Tensor) -> None:
    out.copy_(_dequantize_blockwise(A, absmax, code, blocksize, dtype))


@_fake("dequantize_blockwise.out")
def _(A, absmax, code, blocksize: int, dtype: torch.dtype, out: Tensor) -> None:
    return None


# -- LLM.int8() -----------------------------------------------------------------------------


@_kernel("int8_linear_matmul")
def _(A, B) -> Tensor:
    return F.int8_linear_matmul(A, B)


@_fake("int8_linear_matmul")
def _(A, B) -> Tensor:
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32)


@_kernel("int8_linear_matmul.out")
def _(A, B, out: Tensor) -> None:
    F.int8_linear_matmul(A, B, out=out)


@_fake("int8_linear_matmul.out")
def _(A, B, out: Tensor) -> None:
    return None


@_kernel("int8_vectorwise_quant")
def _(A, threshold: float = 0.0) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    CA, stats, outlier_cols = F.int8_vectorwise_quant(A, threshold)
    return CA, stats, outlier_cols if threshold > 0.0 else None


@_fake("int8_vectorwise_quant")
def _(A, threshold: float = 0.0) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    CA = torch.empty_like(A, dtype=torch.int8)
    stats = A.new_empty((A.numel() // A.shape[-1],), dtype=torch.float32)
    if threshold == 0.0:
        return CA, stats, None
    return CA, stats, A.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@_kernel("int8_vectorwise_dequant")
def _(A, stats) -> Tensor:
    return F.int8_vectorwise_dequant(A, stats)


@_fake("int8_vectorwise_dequant")
def _(A, stats) -> Tensor:
    return torch.empty_like(A, dtype=torch.float32)


@_kernel("int8_mm_dequant")
def _(A, row_stats, col_stats, dtype: Optional[torch.dtype] = None, bias=None) -> Tensor:
    return F.int8_mm_dequant(A, row_stats, col_stats, bias=bias, dtype=dtype)


@_fake("int8_mm_dequant")
def _(A, row_stats, col_stats, dtype: Optional[torch.dtype] = None, bias=None) -> Tensor:
    return torch.empty_like(A, dtype=dtype or torch.float16)


@_kernel("int8_scaled_mm")
def _(A, B, row_stats, col_stats, bias=None, dtype: Optional[torch.dtype] = None) -> Tensor:
    product = F.int8_linear_matmul(A, B)
    return F.int8_mm_dequant(product, row_stats, col_stats, bias=bias, dtype=dtype)


@_fake("int8_scaled_mm")
def _(A, B, row_stats, col_stats, bias=None, dtype: Optional[torch.dtype] = None) -> Tensor:
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=dtype or torch.float16)


@_kernel("int8_mixed_scaled_mm")
def _(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None) -> tuple[Tensor, Optional[Tensor]]:
    if outlier_cols is None:
        outlier_cols = torch.empty(0, dtype=torch.int64, device=A.device)
    return _kbit_int8.int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols, bias)


@_fake("int8_mixed_scaled_mm")
def _(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None) -> tuple[Tensor, Optional[Tensor]]:
    outliers = torch.library.get_ctx().new_dynamic_size()
    return A.new_empty((*CA.shape[:-1], CB.shape[0])), A.new_empty((*A.shape[:-1], outliers))


@_kernel("int8_double_quant")
def _(A, threshold: float = 0.0):
    CA, CAt, row_stats, col_stats, outlier_cols = F.int8_double_quant(A, threshold=threshold)
    return CA, CAt, row_stats, col_stats, outlier_cols if threshold > 0.0 else None


@_fake("int8_double_quant")
def _(A, threshold: float = 0.0):
    outliers = A.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)
    return (
        torch.empty_like(A, dtype=torch.int8),
        torch.empty_like(A, dtype=torch.int8),
        A.new_empty((A.numel() // A.shape[-1],), dtype=torch.float32),
        A.new_empty((A.shape[-1],), dtype=torch.float32),
        outliers if threshold > 0.0 else None,
    )


# -- optimizers -----------------------------------------------------------------------------


def _ignoring_unused(optimizer_name: str, **values: float) -> dict[str, float]:
    # bitsandbytes' kernels ignore hyperparameters a kind does not read (SGD passes eps);
    # kbit refuses non-zero ones, so they are zeroed at this boundary. An unknown kind
    # keeps every value, for kbit to refuse it by name.
    kind = OPTIMIZER_KINDS.get(optimizer_name)
    return {name: value if kind is None or kind.reads_param(name) else 0.0 for name, value in values.items()}


@_kernel("optimizer_update_32bit")
def _(optimizer_name: str, g, p, state1, state2, unorm_vec, max_unorm: float, param_norm: float, beta1: float,
      beta2: float, beta3: float, alpha: float, eps: float, weight_decay: float, step: int, lr: float,
      gnorm_scale: float, skip_zeros: bool = False) -> None:  # fmt: skip
    h = _ignoring_unused(optimizer_name, beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha, eps=eps)
    F.optimizer_update_32bit(
        optimizer_name, g, p, state1, h["beta1"], h["eps"], step, lr, state2=state2, beta2=h["beta2"],
        beta3=h["beta3"], alpha=h["alpha"], weight_decay=weight_decay, gnorm_scale=gnorm_scale, unorm_vec=unorm_vec,
        max_unorm=max_unorm, skip_zeros=skip_zeros,
    )  # fmt: skip


@_kernel("optimizer_update_8bit_blockwise")
def _(optimizer_name: str, g, p, state1, state2, beta1: float, beta2: float, beta3: float, alpha: float, eps: float,
      step: int, lr: float, qmap1, qmap2, absmax1, absmax2, weight_decay: float, gnorm_scale: float,
      skip_zeros: bool = False) -> None:  # fmt: skip
    h = _ignoring_unused(optimizer_name, beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha, eps=eps)
    F.optimizer_update_8bit_blockwise(
        optimizer_name, g, p, state1, state2, h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"], step, lr,
        qmap1, qmap2, absmax1, absmax2, weight_decay=weight_decay, gnorm_scale=gnorm_scale, skip_zeros=skip_zeros,
    )  # fmt: skip


for _name in ("optimizer_update_32bit", "optimizer_update_8bit_blockwise"):
    torch.library.register_fake(f"bitsandbytes::{_name}", lambda *args, **kwargs: None, lib=LIBRARY)
del _name
