"""The bitsandbytes API details kbit keeps for code written against bitsandbytes.

Each test pins one behaviour that downstream code (transformers, peft, FSDP, the
bitsandbytes test suite through ``import kbit as bnb``) relies on; docs/ecosystem.md lists
them, and the differences kbit keeps on purpose.
"""

import copy
import pickle
import warnings

import pytest
import torch

import kbit
import kbit.functional as F
from kbit import KbitTypeError, KbitValueError, QuantStateError
from kbit.nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit


def _seeded(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------------ import paths
def test_import_paths_downstream_code_uses():
    from kbit.nn.modules import Int8Params as ModulesInt8Params
    from kbit.nn.modules import Linear8bitLt as ModulesLinear8bitLt
    from kbit.nn.modules import Params4bit as ModulesParams4bit

    assert (ModulesLinear8bitLt, ModulesParams4bit, ModulesInt8Params) == (Linear8bitLt, Params4bit, Int8Params)
    assert kbit.utils.pack_dict_to_tensor is F.pack_dict_to_tensor
    assert kbit.utils.unpack_tensor_to_dict(kbit.utils.pack_dict_to_tensor({"a": [1, 2]})) == {"a": [1, 2]}
    assert kbit.utils.INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING[0] == "row"
    assert isinstance(F.has_avx512bf16(), bool)


def test_cextension_describes_kbit_and_claims_no_native_library():
    ext = kbit.cextension
    assert ext.BNB_BACKEND == "kbit" and not ext.COMPILED_WITH_CUDA and not ext.HIP_ENVIRONMENT
    assert ext.lib.compiled_with_cuda is False
    with pytest.raises(AttributeError, match="no native bitsandbytes library.*kbit.functional"):
        ext.lib.cquantize_blockwise_fp32
    assert not hasattr(ext.lib, "__array__")


def test_replace_linear_swaps_every_linear_but_the_skipped():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Sequential(torch.nn.Linear(64, 32)))
    model.lm_head = torch.nn.Linear(32, 8)
    kbit.utils.replace_linear(model, lambda i, o, b: Linear4bit(i, o, b, quant_type="nf4"), copy_weights=True)
    assert isinstance(model[0], Linear4bit) and isinstance(model[1][0], Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear


def test_find_outlier_dims_flags_a_column_with_a_large_spread():
    weight = _seeded(256, 64, seed=1)
    weight[:, 13] *= 20
    assert kbit.utils.find_outlier_dims(weight).tolist() == [13]
    assert kbit.utils.find_outlier_dims(weight, topk=1).tolist() == [13]


# -------------------------------------------------------------------------- Params4bit
def test_params4bit_keeps_unknown_keyword_arguments_as_attributes():
    # transformers and peft rebuild weights as type(p)(data, **p.__dict__).
    weight = Params4bit(_seeded(16, 64), quant_type="nf4", ds_id=7, _hf_marker=True)
    assert weight.ds_id == 7 and weight._hf_marker is True
    rebuilt = Params4bit(weight.data, **weight.__dict__)
    assert rebuilt.ds_id == 7 and rebuilt.quant_type == "nf4"
    quantized = rebuilt.to("cpu")
    for copy_ in (quantized.detach(), copy.deepcopy(quantized), pickle.loads(pickle.dumps(quantized))):
        assert copy_.ds_id == 7 and copy_._hf_marker is True and copy_.bnb_quantized
    with pytest.raises(KbitTypeError, match="absmax"):
        Params4bit(_seeded(4, 64), absmax=torch.ones(4))  # a read-only view of the quant state


def test_params4bit_blocksize_none_means_64():
    assert Params4bit(_seeded(2, 64), blocksize=None).blocksize == 64


def test_params4bit_module_is_the_layer_and_survives_copies():
    layer = Linear4bit(64, 16, quant_type="nf4").to("cpu")
    assert layer.weight.module is layer
    twin = copy.deepcopy(layer)
    assert twin.weight.module is twin  # the copy's weight points at the copy
    assert copy.deepcopy(layer.weight).module is layer  # a lone weight keeps its layer
    assert Params4bit(_seeded(2, 64)).module is None


def test_params4bit_reads_quant_state_fields_through():
    weight = Params4bit(_seeded(32, 64), quant_type="nf4", compress_statistics=True)
    assert not hasattr(weight, "absmax") and not hasattr(weight, "nested_absmax")
    weight = weight.to("cpu")
    state = weight.quant_state
    assert weight.absmax is state.absmax and weight.code is state.code and weight.quant_map is state.code
    assert weight.offset is state.offset and weight.nested_offset is state.offset
    assert weight.nested_absmax is state.state2.absmax and weight.nested_quant_map is state.state2.code
    assert weight.nested_code is state.state2.code
    assert (weight.nested_blocksize, weight.nested_dtype) == (256, torch.float32)
    with pytest.raises(AttributeError, match="read from quant_state"):
        weight.absmax = torch.ones(1)
    plain = Params4bit(_seeded(32, 64), quant_type="nf4", compress_statistics=False).to("cpu")
    assert hasattr(plain, "absmax") and not hasattr(plain, "nested_absmax") and not hasattr(plain, "offset")


@pytest.mark.parametrize("split", [lambda p: torch.chunk(p, 2), lambda p: p.split(p.shape[0] // 4)], ids=["chunk", "split"])
def test_chunk_and_split_keep_the_subclass_and_state(split):
    weight = Params4bit(_seeded(32, 64), quant_type="nf4", fsdp_tag="x").to("cpu")
    pieces = split(weight)
    assert len(pieces) > 1 and all(type(piece) is Params4bit for piece in pieces)
    assert all(piece.quant_state is weight.quant_state and piece.fsdp_tag == "x" for piece in pieces)
    assert torch.equal(torch.cat([piece.data for piece in pieces]), weight.data)
    assert type(weight + 0) is torch.Tensor  # other ops still give plain tensors


# ----------------------------------------------------------------------------- Linear4bit
def test_compute_type_is_set():
    layer = Linear4bit(64, 8, quant_type="nf4")
    assert not layer.compute_type_is_set
    layer(_seeded(2, 64, dtype=torch.bfloat16))
    assert layer.compute_type_is_set and layer.compute_dtype == torch.bfloat16
    assert Linear4bit(64, 8, compute_dtype=torch.float32).compute_type_is_set


def test_float16_input_with_float32_compute_dtype_warns_about_speed():
    layer = Linear4bit(64, 8, compute_dtype=torch.float32, quant_type="nf4")
    with pytest.warns(kbit.KbitWarning, match="float16 input is computed in float32"):
        out = layer(_seeded(2, 64, dtype=torch.float16))
    assert out.dtype == torch.float16 and layer.compute_dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Linear4bit(64, 8, quant_type="nf4")(_seeded(2, 64, dtype=torch.float16))  # picks float16: no warning
        Linear4bit(64, 8, compute_dtype=torch.float32)(_seeded(2, 64))


# ---------------------------------------------------------------------- Int8Params, 8-bit
def test_int8params_keeps_unknown_keyword_arguments_as_attributes():
    weight = Int8Params(_seeded(8, 16), requires_grad=False, has_fp16_weights=False, ds_shape=(8, 16))
    moved = weight.to("cpu")
    assert moved.dtype == torch.int8 and moved.ds_shape == (8, 16)
    rebuilt = Int8Params(moved.data, requires_grad=False, **moved.__dict__)
    assert rebuilt.ds_shape == (8, 16) and torch.equal(rebuilt.SCB, moved.SCB)
    assert copy.deepcopy(rebuilt).ds_shape == (8, 16)


def test_int8_checkpoint_into_a_plain_float_weight_is_refused():
    source = Linear8bitLt(16, 8, has_fp16_weights=False).to("cpu")
    target = Linear8bitLt(16, 8, has_fp16_weights=False)
    target.weight = torch.nn.Parameter(torch.zeros(8, 16))  # as weight tying leaves it
    with pytest.raises(QuantStateError, match="SCB.*plain Parameter"):
        target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight, torch.zeros(8, 16))


# ------------------------------------------------------------------------- functional
@pytest.mark.parametrize("row_numel", [1024, 1000], ids=["whole_blocks", "ragged_rows"])
def test_dequantize_blockwise_reads_a_stacked_absmax_row_by_row(row_numel):
    # AdEMAMix 8-bit keeps two first moments stacked: codes (2, n), absmax (2, blocks per row).
    moments = _seeded(2, row_numel, seed=3)
    rows = [F.quantize_blockwise(moment, blocksize=256) for moment in moments]
    absmax = torch.stack([state.absmax for _, state in rows])
    stacked = F.QuantState(absmax, code=rows[0][1].code, blocksize=256)
    result = F.dequantize_blockwise(torch.stack([codes for codes, _ in rows]), stacked)
    expected = torch.stack([F.dequantize_blockwise(codes, state) for codes, state in rows])
    assert torch.equal(result, expected)


@pytest.mark.parametrize("nested", [False, True])
def test_blockwise_8bit_quant_state_survives_as_dict_and_from_dict(nested):
    codes, state = F.quantize_blockwise(_seeded(3, 700, seed=4, dtype=torch.bfloat16), blocksize=512, nested=nested)
    restored = F.QuantState.from_dict(state.as_dict())
    assert restored == state and restored.quant_type is None and restored.dtype == torch.bfloat16
    assert torch.equal(F.dequantize_blockwise(codes, restored), F.dequantize_blockwise(codes, state))
    broken = {**state.as_dict(), "quant_map": state.code.flip(0)}
    with pytest.raises(QuantStateError, match="quant_map.*sorted"):
        F.QuantState.from_dict(broken)
    with pytest.raises(KbitValueError, match="packed form"):
        state.as_dict(packed=True)


@pytest.mark.parametrize("blocksize", [8192, 16384, 65536])
def test_blockwise_blocksizes_above_4096(blocksize):
    values = _seeded(2 * blocksize + 5, seed=5)
    codes, state = F.quantize_blockwise(values, blocksize=blocksize)
    assert state.absmax.shape == (3,)
    torch.testing.assert_close(state.absmax, torch.stack([b.abs().max() for b in values.split(blocksize)]))
    error = (F.dequantize_blockwise(codes, state) - values).abs() / state.absmax.repeat_interleave(blocksize)[: values.numel()]
    assert error.max() < 0.011  # FORMATS.md's bound for 8-bit blockwise (normalised)
    with pytest.raises(KbitValueError, match="blocksize"):
        F.quantize_blockwise(values, blocksize=3000)


def test_get_paged_gives_a_zeroed_tensor_and_says_whether_it_is_paged():
    with pytest.warns(kbit.KbitPagedMemoryWarning, match="ordinary tensor"):
        tensor = F.get_paged(3, 5, dtype=torch.float16, device="cpu")
    assert tensor.shape == (3, 5) and tensor.dtype == torch.float16 and not tensor.any()
    assert tensor.is_paged is False
