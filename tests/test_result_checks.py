"""Checked results at the dispatch boundary: a backend result that contradicts the op's fake
(meta) implementation raises ``BackendResultError`` naming the backend, the op and the
difference, before it reaches the caller (contract v2)."""

import pytest
import torch

import kbit
import kbit.functional as F
from kbit import BackendError
from kbit import BackendResultError
from kbit.backend import API_VERSION, OPTIMIZER_KINDS, BackendManifest, OpSupport, OptimizerStep
from kbit_reference.backend import ReferenceBackend


class WrongShape(ReferenceBackend):
    """The deliberately wrong plugin of the issue: 3 codes for 1024 values."""

    def quantize_blockwise(self, A, *, code, blocksize, **rand):
        codes, absmax = super().quantize_blockwise(A, code=code, blocksize=blocksize, **rand)
        return codes.reshape(-1)[:3], absmax


class Float64Scales(ReferenceBackend):
    """Right values, wrong dtype: float64 NaN scales where float32 was asked for."""

    def quantize_4bit(self, A, **kwargs):
        packed, absmax = super().quantize_4bit(A, **kwargs)
        return packed, torch.full_like(absmax, float("nan"), dtype=torch.float64)


class TooFewScales(ReferenceBackend):
    """One absmax short: the compressed QuantState would be corrupt."""

    def quantize_4bit(self, A, **kwargs):
        packed, absmax = super().quantize_4bit(A, **kwargs)
        return packed, absmax[:-1]


class OneResult(ReferenceBackend):
    def int8_vectorwise_quant(self, A, *, threshold):
        return super().int8_vectorwise_quant(A, threshold=threshold)[0]


class TooManyOutliers(ReferenceBackend):
    """outlier_cols longer than A has columns (a data-dependent length still has a bound)."""

    def int8_vectorwise_quant(self, A, *, threshold):
        CA, stats, _ = super().int8_vectorwise_quant(A, threshold=threshold)
        return CA, stats, torch.arange(A.shape[-1] + 1)


class ReturnsFromUpdate(ReferenceBackend):
    def optimizer_update_32bit(self, step, g, p, state1, state2, unorm_vec):
        super().optimizer_update_32bit(step, g, p, state1, state2, unorm_vec)
        return p


def _register(cls, op, **support):
    name = cls.__name__.lower()
    kbit.backends.register(
        BackendManifest(name=name, api_version=API_VERSION, priority=50, device_types=("cpu",),
                        factory=f"{__name__}:{cls.__name__}", ops={op: OpSupport(**support)})  # fmt: skip
    )
    return name


def test_wrong_shaped_codes_raise_backend_error_naming_backend_op_and_difference():
    name = _register(WrongShape, "quantize_blockwise")
    with pytest.raises(BackendResultError) as caught:
        F.quantize_blockwise(torch.randn(1024), blocksize=256)
    error = caught.value
    assert isinstance(error, BackendError) and error.backend == name and error.op == "quantize_blockwise"
    assert "codes has shape (3,), expected (1024,)" in str(error) and repr(name) in str(error)


@pytest.mark.parametrize("nested", [False, True])
def test_float64_scales_are_refused_before_a_quant_state_is_built(nested):
    _register(Float64Scales, "quantize_4bit")
    with pytest.raises(BackendResultError, match="absmax has dtype torch.float64, expected torch.float32"):
        F.quantize_4bit(torch.randn(256), blocksize=64, compress_statistics=nested)


def test_too_few_scales_with_compressed_statistics_fail_at_the_call():
    _register(TooFewScales, "quantize_4bit")
    with pytest.raises(BackendResultError, match=r"absmax has shape \(3,\), expected \(4,\)"):
        F.quantize_4bit(torch.randn(256), blocksize=64, compress_statistics=True)


def test_a_missing_result_is_named():
    _register(OneResult, "int8_vectorwise_quant")
    with pytest.raises(BackendResultError, match=r"expected a tuple of 3 \(CA, row_stats, outlier_cols\)"):
        F.int8_vectorwise_quant(torch.randn(4, 8))


def test_a_data_dependent_length_is_bounded():
    _register(TooManyOutliers, "int8_vectorwise_quant")
    with pytest.raises(BackendResultError, match=r"outlier_cols has shape \(9,\), expected \(0,\)"):
        F.int8_vectorwise_quant(torch.randn(4, 8))
    with pytest.raises(BackendResultError, match=r"outlier_cols has shape \(9,\), expected \('<=8',\)"):
        F.int8_vectorwise_quant(torch.randn(4, 8) * 10, threshold=1.0)


def test_an_in_place_op_must_return_none():
    _register(ReturnsFromUpdate, "optimizer_update_32bit", optimizers=("adam",))
    p, g = torch.randn(10), torch.randn(10)
    with pytest.raises(BackendResultError, match="returned Tensor, expected None"):
        F.optimizer_update_32bit("adam", g, p, torch.zeros(10), 0.9, 1e-8, 1, 1e-3, torch.zeros(10), 0.999)


def test_a_correct_backend_passes_unchanged():
    codes, state = F.quantize_blockwise(torch.randn(1000), blocksize=256)
    assert codes.shape == (1000,) and state.absmax.shape == (4,)
    update = OptimizerStep(OPTIMIZER_KINDS["adam"], 1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    p = torch.randn(10)
    torch.ops.kbit.optimizer_update_32bit(torch.randn(10), p, torch.zeros(10), torch.zeros(10), None, *update.to_op_args())
