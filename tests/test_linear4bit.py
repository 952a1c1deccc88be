"""Params4bit and Linear4bit: quantize-on-move, forward, state dicts, copies, compile."""

import copy
import io

import pytest
import torch

import kbit
import kbit.functional as F
from kbit import KbitTypeError, KbitValueError, QuantStateError
from kbit.nn import Linear4bit, LinearFP4, LinearNF4, Params4bit


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Modules initialise their weights from the global RNG: make that deterministic too."""
    torch.manual_seed(0)

GOLDEN_KEYS = [
    "weight",
    "bias",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
]


def _seeded(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_same_state_dict(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        assert type(got[key]) is torch.Tensor, key
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def _float_reference(module: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """What the forward must compute: ``x @ W.T + bias`` in the compute dtype, rounded once."""
    weight = F.dequantize_4bit(module.weight, module.weight.quant_state).to(module.compute_dtype)
    bias = None if module.bias is None else module.bias.to(module.compute_dtype)
    return torch.nn.functional.linear(x.to(module.compute_dtype), weight, bias).to(x.dtype)


# ----------------------------------------------------------------------------- goldens
def test_golden_state_dict_loads_directly_and_reproduces_y(goldens):
    golden = goldens["linear4bit"]
    assert list(golden["state_dict"]) == GOLDEN_KEYS
    module = Linear4bit(64, 128, quant_type="nf4")
    assert str(module.load_state_dict(golden["state_dict"])) == "<All keys matched successfully>"
    y = module(golden["x"])
    assert y.dtype == golden["y"].dtype == torch.bfloat16
    # bf16 sums in another order: relative bf16 tolerance, and an ulp of bf16 near zero.
    torch.testing.assert_close(y, golden["y"], rtol=1.6e-2, atol=2**-8)
    _assert_same_state_dict(module.state_dict(), golden["state_dict"])


def test_golden_float_weight_quantizes_to_the_golden_state_dict(goldens):
    golden = goldens["linear4bit"]
    module = LinearNF4(64, 128)
    float_state = {"weight": golden["float_weight"], "bias": golden["state_dict"]["bias"]}
    module.load_state_dict(float_state)  # a float state dict is quantized on load
    assert module.weight.bnb_quantized and module.weight.quant_state.dtype == torch.bfloat16
    _assert_same_state_dict(module.state_dict(), golden["state_dict"])


def test_from_prequantized(goldens):
    golden = goldens["linear4bit"]["state_dict"]
    stats = {k: v for k, v in golden.items() if k.startswith("weight.")}
    weight = Params4bit.from_prequantized(golden["weight"], stats, device="cpu")
    assert weight.bnb_quantized and weight.quant_type == "nf4" and weight.compress_statistics
    assert weight.quant_state.shape == (128, 64) and not weight.requires_grad
    with pytest.raises(QuantStateError, match="cannot hold"):
        Params4bit.from_prequantized(golden["weight"][:-1], stats)


# ------------------------------------------------------------------ quantize on move
def test_quantizes_on_first_move_including_cpu():
    for move in (lambda m: m.to("cpu"), lambda m: m.cpu(), lambda m: m.to(torch.device("cpu"))):
        module = LinearNF4(64, 32)
        assert not module.weight.bnb_quantized and module.weight.shape == (32, 64)
        original = module.weight
        move(module)
        assert module.weight is original  # quantized in place: references stay valid
        assert module.weight.bnb_quantized and module.weight.shape == (32 * 64 // 2, 1)
        assert module.weight.dtype == torch.uint8 and module.quant_state is module.weight.quant_state


def test_quantizes_on_first_forward_and_picks_the_compute_dtype():
    module = LinearFP4(64, 32)
    x = _seeded(3, 64, dtype=torch.float16)
    y = module(x)
    assert module.weight.bnb_quantized and module.compute_dtype == torch.float16
    assert y.dtype == torch.float16 and module.bias.dtype == torch.float32  # bias cast, not changed
    torch.testing.assert_close(y, _float_reference(module, x))


def test_dtype_casts_before_quantization_change_the_float_weight_only():
    module = LinearNF4(64, 32, quant_storage=torch.bfloat16)
    module.to(torch.bfloat16)
    assert not module.weight.bnb_quantized and module.weight.dtype == torch.bfloat16
    module.to("cpu", torch.float16)
    assert module.weight.bnb_quantized and module.weight.quant_state.dtype == torch.float16
    packed = module.weight.data.view(torch.uint8).clone()  # bytes: some are NaN patterns
    module.half()
    module.float()
    module.to(torch.bfloat16)
    # Packed codes stored as a float dtype are never cast: that would destroy them.
    assert module.weight.dtype == torch.bfloat16 and torch.equal(module.weight.data.view(torch.uint8), packed)


def test_moves_carry_the_quant_state():
    module = LinearNF4(64, 32).to("cpu")
    module.to("meta")
    state = module.weight.quant_state
    assert isinstance(module.weight, Params4bit) and module.weight.device.type == "meta"
    assert state.absmax.device.type == "meta" and state.state2.absmax.device.type == "meta"


def test_moving_a_param_leaves_the_original_and_its_state_alone():
    param = LinearNF4(64, 32).to("cpu").weight
    before = copy.deepcopy(param.quant_state)
    moved = param.to("meta")
    assert moved is not param and moved.quant_state is not param.quant_state
    assert moved.quant_state.absmax.device.type == "meta" and moved.quant_state.state2.absmax.device.type == "meta"
    assert param.device.type == "cpu" and param.quant_state == before  # same values, still on the CPU
    assert param.quant_state.state2.absmax.device.type == "cpu"
    F.dequantize_4bit(param, param.quant_state)  # the original still works


def test_quantized_module_through_meta_and_back():
    source = LinearNF4(64, 32).to("cpu")
    module = copy.deepcopy(source).to("meta").to_empty(device="cpu")
    state = module.weight.quant_state
    assert isinstance(module.weight, Params4bit) and state.absmax.device.type == "cpu"
    module.load_state_dict(source.state_dict())
    x = _seeded(2, 64)
    assert torch.equal(module(x), source(x))


def test_quant_storage_follows_the_loaded_weight():
    module = LinearNF4(64, 32, quant_storage=torch.uint8)
    source = LinearNF4(64, 32, quant_storage=torch.bfloat16).to("cpu")
    module.load_state_dict(source.state_dict())
    assert module.weight.dtype == torch.bfloat16 and module.quant_storage == torch.bfloat16


def test_meta_initialisation_then_to_empty():
    torch.manual_seed(0)
    module = LinearNF4(64, 32, device="meta")
    assert isinstance(module.weight, Params4bit) and module.weight.device.type == "meta"
    module.to_empty(device="cpu")  # generic code: the weight comes back as a plain Parameter
    dense = torch.nn.Linear(64, 32)
    module.load_state_dict(dense.state_dict())
    assert isinstance(module.weight, Params4bit) and module.weight.quant_type == "nf4"
    x = _seeded(2, 64)
    torch.testing.assert_close(module(x), _float_reference(module, x))
    # The dense layer's weights, not random ones (those would be off by more than 100%).
    assert (module(x) - dense(x)).abs().mean() < 0.2 * dense(x).abs().mean()
    untouched = LinearFP4(64, 32, device="meta").to_empty(device="cpu")
    torch.nn.init.normal_(untouched.weight)
    untouched(x)  # quantizes on first forward, with the settings it was built with
    assert isinstance(untouched.weight, Params4bit) and untouched.weight.quant_type == "fp4"


def test_moves_that_rebuild_parameters_keep_the_subclass():
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        module = LinearNF4(64, 32).cpu()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert isinstance(module.weight, Params4bit) and module.weight.bnb_quantized
    x = _seeded(2, 64)
    torch.testing.assert_close(module(x), _float_reference(module, x))


# ---------------------------------------------------------------------- forward
@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=str)
def test_forward_dtypes_and_shapes(compute_dtype, storage):
    module = Linear4bit(96, 40, compute_dtype=compute_dtype, quant_type="nf4", quant_storage=storage).cpu()
    for shape in [(5, 96), (2, 3, 96), (0, 96), (96,)]:
        x = _seeded(*shape, seed=len(shape), dtype=torch.float32)
        y = module(x)
        assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
        torch.testing.assert_close(y, _float_reference(module, x))


def test_forward_rejects_unsupported_inputs_without_side_effects():
    module = LinearNF4(64, 32).to("cpu")
    with pytest.raises(KbitTypeError, match="Linear4bit: x has dtype torch.float64"):
        module(torch.zeros(2, 64, dtype=torch.float64))
    assert module.compute_dtype is None
    with pytest.raises(KbitValueError, match="in_features=64"):
        module(torch.zeros(2, 63, dtype=torch.bfloat16))
    assert module.compute_dtype is None
    assert module(torch.zeros(2, 64, dtype=torch.float16)).dtype == torch.float16
    assert module.compute_dtype == torch.float16


def test_constructor_rejects_bad_settings():
    with pytest.raises(KbitValueError, match="quant_type"):
        Linear4bit(64, 32, quant_type="nf5")
    with pytest.raises(KbitValueError, match="quant_storage"):
        Linear4bit(64, 32, quant_storage=torch.int32)
    with pytest.raises(KbitValueError, match="compute_dtype"):
        Linear4bit(64, 32, compute_dtype=torch.float64)


# -------------------------------------------------------------- copies and pickles
def _three_layers(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        LinearNF4(32, 64), torch.nn.ReLU(), LinearFP4(64, 64, compress_statistics=False), torch.nn.GELU(),
        Linear4bit(64, 8, quant_type="nf4", quant_storage=torch.float32),
    )  # fmt: skip


def test_three_layer_model_round_trips_through_its_state_dict():
    model = _three_layers().to("cpu")
    x = _seeded(7, 32, seed=1)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded_state = torch.load(buffer, weights_only=True)
    fresh = _three_layers(seed=1)  # other random weights, not yet quantized
    fresh.load_state_dict(loaded_state)
    assert torch.equal(fresh(x), expected)
    _assert_same_state_dict(fresh.state_dict(), model.state_dict())


def _through_flat_bytes(state: dict) -> dict:
    """What a safetensors file holds: one byte buffer, and per key a dtype, shape and offset."""
    header, chunks, offset = {}, [], 0
    for key, tensor in state.items():
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = (tensor.dtype, tuple(tensor.shape), offset, offset + len(raw))
        chunks.append(raw)
        offset += len(raw)
    buffer = bytearray(b"".join(chunks))
    return {
        key: torch.frombuffer(buffer[start:end], dtype=torch.uint8).view(dtype).reshape(shape)
        for key, (dtype, shape, start, end) in header.items()
    }


def test_safetensors_style_flat_tensors_round_trip():
    model = _three_layers().to("cpu")
    state = model.state_dict()
    # What safetensors requires: plain, contiguous tensors that share no memory.
    pointers = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(pointers)) == len(pointers)
    assert all(type(t) is torch.Tensor and t.is_contiguous() for t in state.values())
    flat = _through_flat_bytes(state)
    assert list(flat) == list(state)
    fresh = _three_layers(seed=2)
    fresh.load_state_dict(flat)
    x = _seeded(3, 32, seed=2)
    assert torch.equal(fresh(x), model(x))


def test_deepcopy_is_independent():
    model = _three_layers().to("cpu")
    twin = copy.deepcopy(model)
    x = _seeded(4, 32, seed=3)
    assert torch.equal(twin(x), model(x))
    assert twin[0].weight.quant_state == model[0].weight.quant_state
    assert twin[0].weight.quant_state is not model[0].weight.quant_state
    twin[0].weight.data.zero_()
    twin[0].weight.quant_state.state2.absmax.zero_()
    assert model[0].weight.data.any() and model[0].weight.quant_state.state2.absmax.any()


def test_torch_save_of_whole_modules_and_params():
    model = _three_layers().to("cpu")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded[0].weight, Params4bit) and loaded[0].weight.bnb_quantized
    x = _seeded(2, 32, seed=4)
    assert torch.equal(loaded(x), model(x))
    unquantized = LinearNF4(8, 4)
    buffer = io.BytesIO()
    torch.save(unquantized.weight, buffer)
    buffer.seek(0)
    weight = torch.load(buffer, weights_only=False)
    assert isinstance(weight, Params4bit) and not weight.bnb_quantized and weight.quant_type == "nf4"


# ------------------------------------------------------------------- bad checkpoints
def _golden_like_state():
    module = LinearNF4(64, 128).to("cpu")
    return module.state_dict()


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)}),
         QuantStateError, "JSON"),
        (lambda sd: sd.update({"weight.absmax": sd["weight.absmax"][:-1]}), QuantStateError, "weight.absmax"),
        (lambda sd: sd.update({"weight": sd["weight"][:-3]}), QuantStateError, "cannot hold"),
        (lambda sd: sd.update({"weight": sd["weight"].to(torch.int32)}), QuantStateError, "int32"),
        (lambda sd: sd.pop("weight.nested_absmax"), QuantStateError, "weight.nested_absmax"),
    ],
    ids=["corrupt-json", "absmax-count", "packed-size", "packed-dtype", "missing-nested"],
)  # fmt: skip
def test_bad_quantized_checkpoints_raise_and_change_nothing(change, error, message):
    state = _golden_like_state()
    change(state)
    module = LinearNF4(64, 128).to("cpu")
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(error, match=message):
        module.load_state_dict(state)
    _assert_same_state_dict(module.state_dict(), before)


def test_checkpoint_of_another_shape_is_rejected():
    state = LinearNF4(64, 64).to("cpu").state_dict()
    module = LinearNF4(64, 128)
    with pytest.raises(QuantStateError, match="shape \\(64, 64\\)"):
        module.load_state_dict(state)
    with pytest.raises(QuantStateError, match="'weight': holds a weight of shape \\(64, 64\\)"):
        module.load_state_dict({"weight": torch.randn(64, 64), "bias": torch.zeros(128)})
    with pytest.raises(QuantStateError, match="float weight"):
        module.load_state_dict({"weight": torch.zeros(128, 64, dtype=torch.int8), "bias": torch.zeros(128)})
    assert not module.weight.bnb_quantized  # untouched by the failed loads


def test_missing_and_unexpected_keys_are_reported():
    module = LinearNF4(64, 32)
    result = module.load_state_dict({"bias": torch.zeros(32), "extra": torch.zeros(1)}, strict=False)
    assert result.missing_keys == ["weight"] and result.unexpected_keys == ["extra"]
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict({"bias": torch.zeros(32)})


# ------------------------------------------------------------------------ compile
@pytest.mark.slow
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16], ids=str)
def test_compiled_forward_has_no_graph_breaks_and_matches_eager(compute_dtype):
    module = Linear4bit(128, 48, compute_dtype=compute_dtype, quant_type="nf4").to("cpu")
    x = _seeded(6, 128, seed=5)
    compiled = torch.compile(module, fullgraph=True)  # fullgraph: any graph break raises
    got = compiled(x)  # with compute_dtype=None the compiled call picks it
    expected = module(x)
    assert module.compute_dtype == (compute_dtype or torch.float32)
    # The bias is added inside the op, before its one rounding (like F.linear): nothing is
    # left for inductor to fuse differently, so bfloat16 results are identical too.
    assert torch.equal(got, expected)
    x.requires_grad_()
    compiled(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    module(x).sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1.6e-2, atol=1e-2)


def test_top_level_names():
    assert kbit.matmul_4bit is kbit.autograd.matmul_4bit
    assert issubclass(LinearNF4, Linear4bit) and LinearNF4(8, 4).weight.quant_type == "nf4"
    assert LinearFP4(8, 4).weight.quant_type == "fp4"


def test_loading_another_checkpoint_replaces_the_expanded_scales():
    # The forward keeps the nested absmax expanded (derived from the state): a load of other
    # weights, in place or as a new state, must never meet the old scales.
    layer = Linear4bit(256, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    other = Linear4bit(256, 64, compute_dtype=torch.float32, quant_type="nf4")
    other.load_state_dict(torch.nn.Linear(256, 64).state_dict())
    other = other.to("cpu")
    x = _seeded(1, 256, seed=7)
    before = layer(x)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x)) and not torch.equal(layer(x), before)
    assert torch.equal(layer(x), _float_reference(layer, x))
    with torch.no_grad():  # an in-place write through the parameter's state, as a user might
        layer.weight.quant_state.state2.absmax.mul_(0.5)
    assert torch.equal(layer(x), _float_reference(layer, x))
