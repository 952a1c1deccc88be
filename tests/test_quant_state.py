"""QuantState: as_dict / from_dict, equality, moves, and the validating reader."""

import copy
import json

import pytest
import torch

import kbit.functional as F
from kbit import KbitValueError, QuantStateError

NF4_KEY = "quant_state.bitsandbytes__nf4"


def _state(nested=True, quant_type="nf4", shape=(40, 64), blocksize=64):
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def _packed(nested=True, prefix="weight."):
    _, state = _state(nested)
    return {prefix + key: value for key, value in state.as_dict(packed=True).items()}


def _with_json(packed: dict, key: str, **changes) -> dict:
    """A copy of a packed dict whose JSON has ``changes`` applied (None deletes a field)."""
    meta = F.unpack_tensor_to_dict(packed[key])
    for field, value in changes.items():
        if value is None:
            meta.pop(field)
        else:
            meta[field] = value
    return {**packed, key: F.pack_dict_to_tensor(meta)}


def _raw(text: bytes) -> torch.Tensor:
    return torch.tensor(list(text), dtype=torch.uint8)


# ------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_as_dict_from_dict_round_trip(nested, quant_type):
    _, state = _state(nested, quant_type)
    unpacked = state.as_dict()
    assert unpacked["quant_type"] == quant_type and unpacked["shape"] == (40, 64) and unpacked["dtype"] == "float32"
    assert ("nested_offset" in unpacked) == nested
    if nested:
        assert isinstance(unpacked["nested_offset"], float) and unpacked["nested_blocksize"] == 256
    packed = state.as_dict(packed=True)
    assert all(isinstance(value, torch.Tensor) for value in packed.values())
    assert list(packed)[-1] == f"quant_state.bitsandbytes__{quant_type}"
    for form in (unpacked, packed):
        assert F.QuantState.from_dict(form) == state
        prefixed = {f"model.layers.3.mlp.down_proj.weight.{k}": v for k, v in form.items()}
        assert F.QuantState.from_dict(prefixed) == state


def test_packed_json_layout():
    packed = _packed(nested=True, prefix="")
    assert list(packed) == ["absmax", "quant_map", "nested_absmax", "nested_quant_map", NF4_KEY]
    text = bytes(packed[NF4_KEY].tolist()).decode("utf-8")
    meta = json.loads(text)
    assert list(meta) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"]
    assert text == json.dumps(meta)  # json.dumps' default separators, as checkpoints hold


def test_as_dict_copies_code_tables():
    _, state = _state()
    packed = state.as_dict(packed=True)
    packed["quant_map"].zero_()
    packed["nested_quant_map"].zero_()
    assert state.code.abs().sum() > 0 and state.state2.code.abs().sum() > 0


def test_equality_and_moves():
    _, state = _state()
    twin = copy.deepcopy(state)
    assert twin == state and twin is not state
    twin.state2.absmax[0] += 1
    assert twin != state
    assert state != _state(nested=False)[1]
    assert (state == "a string") is False
    moved = copy.deepcopy(state).to("meta")
    assert moved.absmax.device.type == "meta" and moved.state2.absmax.device.type == "meta"
    assert moved.code.device.type == "meta" and moved.offset.device.type == "meta"
    restored = F.QuantState.from_dict(state.as_dict(packed=True), device="meta")
    assert restored.absmax.device.type == "meta" and restored.state2.code.device.type == "meta"


def test_eight_bit_states_have_no_packed_form():
    _, state = F.quantize_blockwise(torch.randn(256))
    with pytest.raises(KbitValueError, match="quant_type"):
        state.as_dict(packed=True)


def test_from_dict_does_not_modify_its_input():
    packed = _packed()
    before = {k: v.clone() for k, v in packed.items()}
    F.QuantState.from_dict(packed)
    assert list(packed) == list(before) and all(torch.equal(packed[k], v) for k, v in before.items())


# --------------------------------------------------------------------- bad input
def _corruptions():
    json_key = "weight." + NF4_KEY
    packed = _packed()
    plain = _packed(nested=False)
    good_json = bytes(packed[json_key].tolist())
    yield "non-utf8", {**packed, json_key: _raw(good_json[:20] + b"\xff\xfe" + good_json[22:])}, json_key, "UTF-8"
    yield "truncated", {**packed, json_key: _raw(good_json[:-7])}, json_key, "truncated"
    yield "empty json", {**packed, json_key: _raw(b"")}, json_key, "JSON"
    yield "json list", {**packed, json_key: _raw(b"[1, 2]")}, json_key, "JSON object"
    yield "json int64", {**packed, json_key: packed[json_key].long()}, json_key, "uint8"
    yield "json nested deeply", {**packed, json_key: _raw(b"[" * 100_000 + b"]" * 100_000)}, json_key, "nested too deeply"
    yield "json on meta", {**packed, json_key: packed[json_key].to("meta")}, json_key, "meta tensor"
    nf5 = {k.replace("nf4", "nf5"): v for k, v in packed.items()}
    yield "unknown type in key", nf5, "weight.quant_state.bitsandbytes__nf5", "nf5"
    yield "type contradicts key", _with_json(packed, json_key, quant_type="fp4"), f"{json_key}:quant_type", "contradicts"
    yield "unknown unpacked type", {**_state()[1].as_dict(), "quant_type": "int4"}, "quant_type", "int4"
    for bad in (-64, 100, 2**40, "64", 64.0, True):
        yield f"blocksize {bad!r}", _with_json(packed, json_key, blocksize=bad), f"{json_key}:blocksize", "blocksize|valid"
    yield "missing blocksize", _with_json(packed, json_key, blocksize=None), "weight.blocksize", "missing"
    for bad in ([-40, 64], [40, 64.5], "40x64", [2**40, 2**40], [1] * 17, [40, True]):
        yield f"shape {bad!r}", _with_json(packed, json_key, shape=bad), f"{json_key}:shape", "shape|size|absurd"
    yield "shape does not match absmax", _with_json(packed, json_key, shape=[80, 64]), "weight.absmax", "shape \\(80,\\)"
    for bad in ("float64", "int8", 3):
        yield f"dtype {bad!r}", _with_json(packed, json_key, dtype=bad), f"{json_key}:dtype", "dtype"
    yield "absmax dtype", {**plain, "weight.absmax": plain["weight.absmax"].half()}, "weight.absmax", "float16"
    yield "absmax not a tensor", {**plain, "weight.absmax": [1.0] * 40}, "weight.absmax", "tensor"
    yield "nested absmax float", {**packed, "weight.absmax": packed["weight.absmax"].float()}, "weight.absmax", "uint8"
    yield "wrong quant_map", {**packed, "weight.quant_map": F.get_4bit_type("fp4")}, "weight.quant_map", "nf4 table"
    yield "short quant_map", {**packed, "weight.quant_map": torch.zeros(8)}, "weight.quant_map", "\\(16,\\)"
    missing = {k: v for k, v in packed.items() if k != "weight.nested_absmax"}
    yield "missing nested_absmax", missing, "weight.nested_absmax", "missing"
    yield "nested_absmax size", {**packed, "weight.nested_absmax": torch.ones(3)}, "weight.nested_absmax", "\\(1,\\)"
    for bad in (float("nan"), 1e308, 10**400, "0.5", None):
        corrupted = _with_json(packed, json_key, nested_offset=bad) if bad is not None else _with_json(
            packed, json_key, nested_offset=None
        )
        key = f"{json_key}:nested_offset" if bad is not None else "weight.nested_offset"
        yield f"nested_offset {str(bad)[:8]}", corrupted, key, "finite float32 number|missing"
    yield "nested_blocksize", _with_json(packed, json_key, nested_blocksize=-256), f"{json_key}:nested_blocksize", "-256"
    two = {**packed, "other.quant_state.bitsandbytes__nf4": packed[json_key]}
    yield "two packed states", two, "other.quant_state.bitsandbytes__nf4", "second packed"
    doubled = {**packed, "other.absmax": packed["weight.absmax"]}
    yield "field under two prefixes", doubled, "other.absmax", "weight.absmax"
    yield "nothing there", {"weight.bias": torch.zeros(3)}, "quant_state", "neither"
    yield "not a dict", [("absmax", torch.zeros(1))], "<quant state>", "dict"


@pytest.mark.parametrize(("case", "qs_dict", "key", "message"), list(_corruptions()), ids=lambda v: v if isinstance(v, str) else "")
def test_reader_rejects_corrupted_states_naming_the_key(case, qs_dict, key, message):
    with pytest.raises(QuantStateError, match=message) as raised:
        F.QuantState.from_dict(qs_dict)
    assert raised.value.key == key
    assert isinstance(raised.value, ValueError)  # existing `except ValueError` code still catches it


def test_unpack_tensor_to_dict_names_its_key():
    with pytest.raises(QuantStateError) as raised:
        F.unpack_tensor_to_dict(_raw(b'{"a": '), key="layer.quant_state.bitsandbytes__fp4")
    assert raised.value.key == "layer.quant_state.bitsandbytes__fp4"
    assert F.unpack_tensor_to_dict(F.pack_dict_to_tensor({"a": [1, 2], "b": "x"})) == {"a": [1, 2], "b": "x"}
