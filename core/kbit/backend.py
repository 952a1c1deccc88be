"""The backend contract: what a kbit backend implements and how it describes itself.

A backend is a subclass of :class:`Backend` plus a :class:`BackendManifest` published under
the ``kbit.backends`` entry-point group. The core never calls a backend for a variant its
manifest does not declare; a method the backend does not override refuses with
:class:`UnsupportedOpError`.

Methods receive arguments the public API has already validated and normalised (contiguous
tensors, supported dtypes, blocksizes from the manifest), so a backend computes and never
re-validates. Every method is "tensors in, tensors out": outputs are freshly allocated on
the input's device unless the method is documented to update its arguments in place (the
optimizer updates and ``histogram_scatter_add_2d``).

Numerics and byte formats every backend must match are in ``docs/formats.md``.
"""

from __future__ import annotations

import abc
from typing import Optional, Sequence

import torch

from ._errors import (
    BackendError,
    BackendNotFoundError,
    BackendResultError,
    BackendUnavailableError,
    KbitError,
    KbitFallbackWarning,
    KbitPluginWarning,
    NoBackendError,
    UnsupportedOpError,
)
from ._manifest import API_VERSION, BackendManifest, OpSupport
from ._optim_step import OPTIMIZER_KINDS, OptimizerKind, OptimizerStep
from ._opnames import ALL_OPS, OP_FAMILIES

__all__ = [
    "API_VERSION",
    "ALL_OPS",
    "OP_FAMILIES",
    "Backend",
    "BackendManifest",
    "OpSupport",
    "OptimizerKind",
    "OptimizerStep",
    "OPTIMIZER_KINDS",
    "KbitError",
    "UnsupportedOpError",
    "NoBackendError",
    "BackendError",
    "BackendNotFoundError",
    "BackendResultError",
    "BackendUnavailableError",
    "KbitPluginWarning",
    "KbitFallbackWarning",
]

Tensor = torch.Tensor


class Backend(abc.ABC):
    """Base class of every kbit backend.

    Subclasses override :meth:`is_available` and the op methods they implement. The
    registry sets :attr:`manifest` right after building the instance from the manifest's
    ``factory``; a backend constructed by hand (in a unit test, say) has none and is named
    after its class.
    """

    #: The manifest this backend was built from; set by the registry.
    manifest: Optional[BackendManifest] = None

    @property
    def name(self) -> str:
        """The registry name of this backend."""
        return self.manifest.name if self.manifest is not None else type(self).__name__

    @abc.abstractmethod
    def is_available(self) -> bool | str:
        """Say whether this backend can run here.

        Called once per process, on first use. Return ``True`` when usable; otherwise
        ``False`` or, better, a short string saying why not (``"no CUDA device"``), which
        ``kbit info`` shows to the user. Must not raise for ordinary absence of hardware.
        """

    def _refuse(self, op: str) -> UnsupportedOpError:
        return UnsupportedOpError(op, self.name, "not implemented by this backend")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend {self.name!r}>"

    # ------------------------------------------------------------------ 8-bit blockwise
    def quantize_blockwise(
        self, A: Tensor, *, code: Tensor, blocksize: int, rand: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """Quantize ``A`` in consecutive blocks of ``blocksize`` (row-major flattening).

        Returns ``(codes, absmax)``: uint8 codes with ``A``'s shape (index of the nearest
        value of the sorted 256-entry ``code`` to ``x * (1 / absmax[block])``, ties to the
        lower index) and float32 ``absmax`` of shape ``(ceil(numel / blocksize),)``.

        ``rand`` is passed (by keyword) only to a backend whose manifest declares
        ``roundings=("nearest", "stochastic")`` for this op, so a backend without
        stochastic rounding need not take the argument. It asks for stochastic rounding:
        a contiguous float32 tensor of uniform [0, 1) values, as many as ``A`` has elements
        or at least 1024 read cyclically (element ``i`` uses ``rand[i % rand.numel()]``).
        With ``lo <= x <= hi`` the neighbouring code values, the element takes ``hi`` when
        ``rand < (x - lo) / (hi - lo)`` (float32) and ``lo`` otherwise; see
        docs/formats.md section 2.
        """
        raise self._refuse("quantize_blockwise")

    def dequantize_blockwise(
        self, A: Tensor, *, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype
    ) -> Tensor:
        """Return ``code[A] * absmax[block]`` computed in float32, cast to ``dtype``."""
        raise self._refuse("dequantize_blockwise")

    def quantize(self, A: Tensor, *, code: Tensor) -> tuple[Tensor, Tensor]:
        """Whole-tensor 8-bit quantization: one absmax for all of ``A``.

        Returns ``(codes, absmax)`` with ``absmax`` of shape ``(1,)``.
        """
        raise self._refuse("quantize")

    def dequantize(self, A: Tensor, *, absmax: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
        """Inverse of :meth:`quantize`: ``code[A] * absmax`` cast to ``dtype``."""
        raise self._refuse("dequantize")

    def quantize_no_absmax(self, A: Tensor, *, code: Tensor) -> Tensor:
        """Map already-normalised values to the index of the nearest ``code`` value (uint8)."""
        raise self._refuse("quantize_no_absmax")

    def dequantize_no_absmax(self, A: Tensor, *, code: Tensor, dtype: torch.dtype) -> Tensor:
        """Return ``code[A]`` cast to ``dtype``."""
        raise self._refuse("dequantize_no_absmax")

    def estimate_quantiles(self, A: Tensor, *, offset: float, num_quantiles: int) -> Tensor:
        """Return ``num_quantiles`` equidistant quantiles of ``A`` between ``offset`` and
        ``1 - offset`` as float32."""
        raise self._refuse("estimate_quantiles")

    def histogram_scatter_add_2d(
        self, histogram: Tensor, *, index1: Tensor, index2: Tensor, source: Tensor
    ) -> None:
        """In place: ``histogram[index1[i], index2[i]] += source[i]`` for every ``i``."""
        raise self._refuse("histogram_scatter_add_2d")

    # ------------------------------------------------------------------------- 4-bit
    def quantize_4bit(
        self, A: Tensor, *, blocksize: int, quant_type: str, quant_storage: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Quantize ``A`` to 4-bit ``quant_type`` ("nf4" or "fp4") codes in blocks.

        Returns ``(packed, absmax)``: two codes per byte (element ``2j`` in the high nibble,
        an odd count padding the last low nibble with the code of 0.0), the bytes
        zero-padded to whole ``quant_storage`` elements and viewed as a
        ``(ceil(((numel + 1) // 2) / itemsize), 1)`` tensor of ``quant_storage``, and
        float32 ``absmax`` per block.
        """
        raise self._refuse("quantize_4bit")

    def dequantize_4bit(
        self,
        A: Tensor,
        *,
        absmax: Tensor,
        blocksize: int,
        quant_type: str,
        shape: Sequence[int],
        dtype: torch.dtype,
    ) -> Tensor:
        """Unpack the codes in ``A`` (any storage dtype, read as bytes) and return
        ``table[code] * absmax[block]`` computed in float32, as ``dtype`` with ``shape``."""
        raise self._refuse("dequantize_4bit")

    def gemv_4bit(
        self,
        A: Tensor,
        B: Tensor,
        *,
        shape: Sequence[int],
        absmax: Tensor,
        blocksize: int,
        quant_type: str,
        bias: Optional[Tensor] = None,
    ) -> Tensor:
        """``A @ dequant(B).T (+ bias)`` for a single input row (``A`` has one row, any
        leading dims of size 1), dequantizing ``B`` (logical ``shape`` ``[out, in]``, float32
        ``absmax``) on the fly. Output ``(*A.shape[:-1], out)`` in ``A``'s dtype.

        ``bias`` (``(out,)``, ``A``'s dtype, or None) is added before the result is rounded
        to ``A``'s dtype, once, as ``torch.nn.functional.linear`` does."""
        raise self._refuse("gemv_4bit")

    def matmul_4bit(
        self,
        A: Tensor,
        B: Tensor,
        *,
        shape: Sequence[int],
        absmax: Tensor,
        blocksize: int,
        quant_type: str,
        bias: Optional[Tensor] = None,
    ) -> Tensor:
        """``A @ dequant(B).T (+ bias)`` for any leading dimensions of ``A``; output in
        ``A``'s dtype, the bias added before that one rounding (as for :meth:`gemv_4bit`)."""
        raise self._refuse("matmul_4bit")

    # ------------------------------------------------------------------------- int8
    # Rows are all leading dimensions of ``A``; statistics are float32, one per row (or
    # column); ``outlier_cols`` is an int64 tensor, empty when there are none.
    def int8_vectorwise_quant(self, A: Tensor, *, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
        """Row-wise absmax int8 quantization; returns ``(CA, row_stats, outlier_cols)``.

        With ``threshold > 0`` elements with ``|a| >= threshold`` are outliers: they are left
        out of the row absmax and every column holding one is zeroed in ``CA``.
        ``CA = round_half_even(A * 127 / row_stats)`` with ``A``'s shape; a zero statistic
        gives zero codes.
        """
        raise self._refuse("int8_vectorwise_quant")

    def int8_vectorwise_dequant(self, A: Tensor, *, stats: Tensor) -> Tensor:
        """Return ``A * stats[:, None] / 127`` in float32."""
        raise self._refuse("int8_vectorwise_dequant")

    def int8_linear_matmul(self, A: Tensor, B: Tensor) -> Tensor:
        """Exact ``A @ B.T`` of int8 ``A`` (``[..., K]``) and ``B`` (``[N, K]``), accumulated
        and returned in int32 (``[..., N]``)."""
        raise self._refuse("int8_linear_matmul")

    def int8_mm_dequant(
        self,
        A: Tensor,
        *,
        row_stats: Tensor,
        col_stats: Tensor,
        bias: Optional[Tensor],
        dtype: torch.dtype,
    ) -> Tensor:
        """Scale an int32 product back: ``A * row[:, None] * col[None, :] / 127**2 (+ bias)``,
        computed in float32 and returned as ``dtype``."""
        raise self._refuse("int8_mm_dequant")

    def int8_double_quant(self, A: Tensor, *, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Row- and column-wise int8 quantization; ``(CA, CAt, row_stats, col_stats, outlier_cols)``.

        ``CA``/``row_stats``/``outlier_cols`` as in :meth:`int8_vectorwise_quant`; ``CAt``
        (``A``'s shape) and ``col_stats`` quantize each column by its absmax, outliers masked.
        """
        raise self._refuse("int8_double_quant")

    def int8_mixed_scaled_mm(
        self,
        A: Tensor,
        *,
        CA: Tensor,
        CB: Tensor,
        SCA: Tensor,
        SCB: Tensor,
        outlier_cols: Tensor,
        bias: Optional[Tensor],
    ) -> tuple[Tensor, Tensor]:
        """LLM.int8() mixed matmul: int8 product of the regular columns plus the outlier
        columns in 16-bit (``A[:, cols] @ dequant(CB)[:, cols].T``). Returns ``(out, subA)``:
        ``out`` in ``A``'s dtype, ``subA = A[:, outlier_cols]`` (rows x len(cols))."""
        raise self._refuse("int8_mixed_scaled_mm")

    # -------------------------------------------------------------------- optimizers
    # Every update mutates ``p`` and its state tensors in place and returns nothing. All
    # scalars of the update come as one :class:`OptimizerStep` (kind, step count, learning
    # rate, betas, ...); ``step.kind`` is an :class:`OptimizerKind` row of
    # :data:`OPTIMIZER_KINDS`, which says whether weight decay is decoupled or L2 and which
    # hyperparameters the rule reads. A manifest lists the kinds it serves in
    # ``OpSupport.optimizers``. Update rules and state layout: docs/formats.md section 5.
    # ``g`` and ``p`` share a float dtype and shape and are contiguous; for a kind with
    # ``stacked_state1`` (AdEMAMix) ``state1`` is ``(2, *p.shape)`` (its absmax
    # ``(2, nblocks)``). ``state2`` (and ``qmap2``, ``absmax2``, ``max2``, ``new_max2``)
    # are None for one-state kinds.

    def optimizer_update_32bit(
        self,
        step: OptimizerStep,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        unorm_vec: Optional[Tensor],
    ) -> None:
        """One optimizer step with float32 state, updating ``p`` and the states in place.

        With ``step.max_unorm > 0`` the backend computes ``||p||`` itself, stores the
        squared update norm in ``unorm_vec[0]`` and scales the update down to at most
        ``max_unorm * ||p||``. ``step.skip_zeros`` leaves elements whose gradient is
        exactly zero untouched (parameter and state).
        """
        raise self._refuse("optimizer_update_32bit")

    def optimizer_update_8bit(
        self,
        step: OptimizerStep,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        *,
        qmap1: Tensor,
        qmap2: Optional[Tensor],
        max1: Tensor,
        max2: Optional[Tensor],
        new_max1: Tensor,
        new_max2: Optional[Tensor],
        unorm_vec: Optional[Tensor],
    ) -> None:
        """One step with whole-tensor 8-bit state (one absmax per state), in place.

        States are read with the scales ``max1``/``max2``; the updated states' absmax is
        written to ``new_max1``/``new_max2`` and the states are requantized with it. The
        caller swaps ``max`` and ``new_max`` for the next step. ``skip_zeros`` is never set
        for this layout.
        """
        raise self._refuse("optimizer_update_8bit")

    def optimizer_update_8bit_blockwise(
        self,
        step: OptimizerStep,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        *,
        qmap1: Tensor,
        qmap2: Optional[Tensor],
        absmax1: Tensor,
        absmax2: Optional[Tensor],
    ) -> None:
        """One step with blockwise 8-bit state (absmax per 256 elements), in place.

        Each state block is dequantized, updated in float32 and requantized to the nearest
        code with a fresh absmax, which is written back to ``absmax1``/``absmax2``.
        ``max_unorm`` is always 0 for this layout.
        """
        raise self._refuse("optimizer_update_8bit_blockwise")

    def percentile_clipping(
        self, grad: Tensor, gnorm_vec: Tensor, *, step: int, percentile: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Record ``||grad||^2`` in ``gnorm_vec`` (in place) and return
        ``(current_gnorm, clip_value, gnorm_scale)`` as 0-d float32 tensors."""
        raise self._refuse("percentile_clipping")

    def paged_zeros(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A zero-filled tensor in memory the device can page out to the host (paged optimizers).

        Only called on backends whose manifest lists the ``"paged_memory"`` feature; the
        tensor must behave as an ordinary tensor on ``device`` for every op.
        """
        raise UnsupportedOpError("paged_zeros", self.name, "this backend has no paged (managed) memory")
