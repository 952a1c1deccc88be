"""Error classes across kbit.functional, kbit.nn, kbit.autograd and kbit.optim.

A scalar of the wrong type raises KbitTypeError, a number out of range KbitValueError; both
name the op, the argument and the value. Nothing escapes as a bare TypeError or as the
RuntimeError torch's op schema raises for a wrong scalar type.
"""

import pytest
import torch

import kbit
import kbit.functional as F
import kbit.nn as knn
from kbit import KbitTypeError, KbitValueError
from kbit.functional._validate import check_choice, check_int, check_real

A = torch.randn(256, generator=torch.Generator().manual_seed(0))
W = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))


def _optimizer_32bit(**overrides):
    args = dict(beta1=0.9, eps=1e-8, step=1, lr=1e-3, beta2=0.99)
    args.update(overrides)
    p = A.clone()
    return F.optimizer_update_32bit("adam", A.clone(), p, torch.zeros(256), state2=torch.zeros(256), **args)


CALLS = {
    "quantize_blockwise": lambda v: F.quantize_blockwise(A, blocksize=v),
    "dequantize_blockwise": lambda v: F.dequantize_blockwise(
        torch.zeros(256, dtype=torch.uint8), absmax=torch.ones(4), blocksize=v
    ),
    "quantize_4bit": lambda v: F.quantize_4bit(A, blocksize=v),
    "Params4bit": lambda v: knn.Params4bit(W, blocksize=v),
    "estimate_quantiles/num_quantiles": lambda v: F.estimate_quantiles(A, num_quantiles=v),
    "estimate_quantiles/offset": lambda v: F.estimate_quantiles(A, offset=v),
    "int8_vectorwise_quant": lambda v: F.int8_vectorwise_quant(W, threshold=v),
    "int8_double_quant": lambda v: F.int8_double_quant(W, threshold=v),
    "Linear8bitLt": lambda v: knn.Linear8bitLt(64, 8, threshold=v),
    "matmul": lambda v: kbit.matmul(torch.randn(2, 64), W, threshold=v),
    "create_dynamic_map": lambda v: F.create_dynamic_map(total_bits=v),
    "create_linear_map": lambda v: F.create_linear_map(total_bits=v),
    "create_normal_map": lambda v: F.create_normal_map(offset=v),
    "create_fp8_map": lambda v: F.create_fp8_map(exponent_bits=v),
    "percentile_clipping/step": lambda v: F.percentile_clipping(A, torch.zeros(100), v),
    "percentile_clipping/percentile": lambda v: F.percentile_clipping(A, torch.zeros(100), 1, percentile=v),
    "optimizer_update_32bit/step": lambda v: _optimizer_32bit(step=v),
    "optimizer_update_32bit/lr": lambda v: _optimizer_32bit(lr=v),
    "Adam8bit/lr": lambda v: kbit.optim.Adam8bit([torch.nn.Parameter(W.clone())], lr=v),
    "Adam/percentile_clipping": lambda v: kbit.optim.Adam([torch.nn.Parameter(W.clone())], percentile_clipping=v),
}

# (call, argument named in the message, wrong-type value, out-of-range value)
CASES = [
    ("quantize_blockwise", "blocksize", "64", 100),
    ("quantize_blockwise", "blocksize", 64.0, 32),
    ("dequantize_blockwise", "blocksize", True, 100),
    ("quantize_4bit", "blocksize", None, 16),
    ("Params4bit", "blocksize", "64", 48),
    ("estimate_quantiles/num_quantiles", "num_quantiles", 8.0, 0),
    ("estimate_quantiles/offset", "offset", None, 0.5),
    ("int8_vectorwise_quant", "threshold", None, -1.0),
    ("int8_double_quant", "threshold", "6", float("nan")),
    ("Linear8bitLt", "threshold", None, float("inf")),
    ("matmul", "threshold", "x", -0.5),
    ("create_dynamic_map", "total_bits", "8", 9),
    ("create_linear_map", "total_bits", None, 0),
    ("create_normal_map", "offset", None, 1.0),
    ("create_fp8_map", "exponent_bits", "4", 9),
    ("percentile_clipping/step", "step", "1", 0),
    ("percentile_clipping/percentile", "percentile", True, 100),
    ("optimizer_update_32bit/step", "step", None, 0),
    ("optimizer_update_32bit/lr", "lr", None, -1e-3),
    ("Adam8bit/lr", "lr", "1e-3", -1.0),
    ("Adam/percentile_clipping", "percentile_clipping", 5.0, 101),
]


@pytest.mark.parametrize(("call", "argument", "wrong_type", "out_of_range"), CASES, ids=[c[0] for c in CASES])
def test_a_wrong_scalar_type_is_a_kbit_type_error_naming_argument_and_value(call, argument, wrong_type, out_of_range):
    with pytest.raises(KbitTypeError) as caught:
        CALLS[call](wrong_type)
    assert caught.value.argument == argument
    assert argument in str(caught.value) and repr(wrong_type) in str(caught.value)


@pytest.mark.parametrize(("call", "argument", "wrong_type", "out_of_range"), CASES, ids=[c[0] for c in CASES])
def test_an_out_of_range_number_is_a_kbit_value_error_naming_argument_and_value(call, argument, wrong_type, out_of_range):
    with pytest.raises(KbitValueError) as caught:
        CALLS[call](out_of_range)
    assert argument in caught.value.argument
    assert str(out_of_range) in str(caught.value) or repr(float(out_of_range)) in str(caught.value)


@pytest.mark.parametrize("value", [3, 3.5, torch.tensor(3.5)], ids=["int", "float", "tensor"])
def test_check_real_accepts_ints_floats_and_one_element_tensors(value):
    assert check_real("op", "x", value, low=0.0, high=4.0) == float(value)


@pytest.mark.parametrize(("value", "kwargs"), [(0.0, {"low": 0.0, "low_open": True}), (1.0, {"high": 1.0, "high_open": True})])
def test_check_real_open_bounds_exclude_the_bound(value, kwargs):
    with pytest.raises(KbitValueError, match=r"expected a finite number in [\(\[].*[\)\]]"):
        check_real("op", "x", value, **kwargs)


def test_check_real_refuses_a_tensor_of_several_elements():
    with pytest.raises(KbitTypeError, match="x has"):
        check_real("op", "x", torch.ones(2))


@pytest.mark.parametrize(("value", "error"), [(2, None), (0, KbitValueError), (5, KbitValueError), (2.0, KbitTypeError)])
def test_check_int_bounds_are_inclusive(value, error):
    if error is None:
        assert check_int("op", "n", value, low=1, high=4) == value
    else:
        with pytest.raises(error, match="op: n"):
            check_int("op", "n", value, low=1, high=4)


def test_check_choice_keeps_non_int_choices_a_value_question():
    # Only int choices (blocksizes) get the type check: an unknown quant type is a bad value.
    with pytest.raises(KbitValueError, match="quant_type=3"):
        check_choice("op", "quant_type", 3, ("nf4", "fp4"))


# ------------------------------------------------------------ malformed quantized payloads
_CODES8, _STATE8 = F.quantize_blockwise(A, blocksize=64)
_PACKED, _STATE4 = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
_SHORT4 = F.QuantState(_STATE4.absmax[:-1], shape=W.shape, blocksize=64, quant_type="nf4", dtype=torch.float32)

# (call, op, key named in the message)
PAYLOADS = [
    (lambda: F.dequantize_blockwise(_CODES8.float(), _STATE8), "dequantize_blockwise", "A"),
    (lambda: F.dequantize_blockwise(_CODES8[:200], _STATE8), "dequantize_blockwise", "A"),
    (lambda: F.dequantize_blockwise(_CODES8, absmax=torch.ones(3), blocksize=64), "dequantize_blockwise", "absmax"),
    (lambda: F.dequantize(_CODES8.to(torch.int8), absmax=torch.ones(1)), "dequantize", "A"),
    (lambda: F.dequantize(_CODES8, absmax=torch.ones(2)), "dequantize", "absmax"),
    (lambda: F.dequantize_4bit(_PACKED.to(torch.int32), _STATE4), "dequantize_4bit", "A"),
    (lambda: F.dequantize_4bit(_PACKED[:-1], _STATE4), "dequantize_4bit", "A"),
    (lambda: F.dequantize_4bit(_PACKED, _SHORT4), "dequantize_4bit", "quant_state.absmax"),
    (lambda: kbit.matmul_4bit(torch.randn(2, 64), _PACKED.to(torch.int16), _STATE4), "matmul_4bit", "B"),
    (lambda: F.gemv_4bit(torch.randn(1, 64), _PACKED[:-2], state=_STATE4), "gemv_4bit", "B"),
]


@pytest.mark.parametrize(("call", "op", "key"), PAYLOADS)
def test_codes_that_contradict_their_state_raise_quant_state_error(call, op, key):
    with pytest.raises(kbit.QuantStateError) as caught:
        call()
    assert (caught.value.op, caught.value.key) == (op, key)
    assert str(caught.value).startswith(f"{op}: {key}: ")


def test_codes_that_are_not_a_tensor_stay_a_type_error():
    with pytest.raises(KbitTypeError, match="A has type list"):
        F.dequantize_blockwise([1, 2, 3], _STATE8)


@pytest.mark.parametrize(
    "weight",
    [torch.zeros(8, 64, dtype=torch.int8), torch.randn(8, 32)],
    ids=["codes-without-state", "float-of-another-shape"],
)
def test_a_4bit_checkpoint_with_a_bad_weight_raises_quant_state_error_naming_the_key(weight):
    module = knn.LinearNF4(64, 8)
    with pytest.raises(kbit.QuantStateError) as caught:
        module.load_state_dict({"weight": weight, "bias": torch.zeros(8)})
    assert caught.value.key == "weight" and caught.value.op is None
