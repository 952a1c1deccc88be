"""Int8Params, Linear8bitLt and Embedding8bit: quantization on move, state dicts, training."""

import copy

import pytest
import torch

import kbit
import kbit.functional as F
from kbit.nn import Embedding8bit, Int8Params, Linear8bitLt
from kbit.testing.tolerances import INT8_CODE_MISMATCH_FRACTION, INT8_MATMUL_REL_ERR, relative_error


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _frozen_layer(in_features=64, out_features=32, seed=0, **kwargs) -> Linear8bitLt:
    torch.manual_seed(seed)
    return Linear8bitLt(in_features, out_features, has_fp16_weights=False, **kwargs)


# ----------------------------------------------------------------------------- goldens
def test_linear8bit_golden_loads_into_an_unquantized_module(goldens):
    golden = goldens["linear8bit"]
    state_dict, float_weight = golden["state_dict"], golden["float_weight"]
    layer = _frozen_layer()
    assert layer.weight.dtype == torch.float32  # not quantized yet
    layer.load_state_dict(state_dict)
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight.data, state_dict["weight"])
    assert torch.equal(layer.weight.SCB, state_dict["SCB"])
    x = torch.randn(8, 64, generator=_gen(1))
    expected = torch.nn.functional.linear(x, float_weight.float(), state_dict["bias"])
    assert relative_error(layer(x), expected) < INT8_MATMUL_REL_ERR
    # Saving gives back exactly the golden dict: same keys, order, dtypes and bytes.
    saved = layer.state_dict()
    assert list(saved) == list(state_dict) == ["weight", "bias", "SCB", "weight_format"]
    for key, value in state_dict.items():
        assert saved[key].dtype == value.dtype and saved[key].shape == value.shape and torch.equal(saved[key], value), key


def test_quantizing_the_golden_float_weight_reproduces_its_state_dict(goldens):
    golden = goldens["linear8bit"]
    state_dict = golden["state_dict"]
    layer = _frozen_layer()
    with torch.no_grad():
        layer.weight.copy_(golden["float_weight"].float())
        layer.bias.copy_(state_dict["bias"])
    layer.to("cpu")
    saved = layer.state_dict()
    assert torch.equal(saved["SCB"], state_dict["SCB"])
    step = (saved["weight"].int() - state_dict["weight"].int()).abs()
    assert step.max() <= 1 and (step != 0).float().mean() <= INT8_CODE_MISMATCH_FRACTION
    assert saved["weight_format"].dtype == torch.uint8 and saved["weight_format"].shape == ()
    assert int(saved["weight_format"]) == 0


# --------------------------------------------------------------------------- Int8Params
@pytest.mark.parametrize("move", [lambda p: p.to("cpu"), lambda p: p.cpu(), lambda p: p.to(torch.device("cpu"))])
def test_int8params_quantize_on_first_move(move):
    w = torch.randn(16, 32, generator=_gen(2))
    param = Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    moved = move(param)
    assert moved is param and param.dtype == torch.int8 and not param.requires_grad
    CB, SCB, _ = F.int8_vectorwise_quant(w)
    assert torch.equal(param.data, CB) and torch.equal(param.SCB, SCB)
    assert param.CB.data_ptr() == param.data_ptr()
    again = param.to("cpu")  # an int8 weight is never re-quantized
    assert again is param and torch.equal(param.data, CB)


def test_int8params_with_fp16_weights_stay_float():
    w = torch.randn(16, 32, generator=_gen(3))
    param = Int8Params(w.clone(), requires_grad=True, has_fp16_weights=True)
    moved = param.to("cpu")
    assert moved.dtype == torch.float32 and moved.requires_grad and torch.equal(moved, w)
    assert param.SCB is None


def test_dtype_only_move_does_not_quantize_and_never_casts_codes():
    param = Int8Params(torch.randn(4, 8, generator=_gen(4)), requires_grad=False)
    half = param.to(torch.float16)
    assert half.dtype == torch.float16 and isinstance(half, Int8Params)
    param.to("cpu")
    assert param.to(torch.float16).dtype == torch.int8


def test_module_moves_quantize_and_casts_keep_codes():
    layer = _frozen_layer(seed=5)
    layer.half()  # dtype only: still float, not quantized
    assert layer.weight.dtype == torch.float16
    layer.to("cpu")
    assert layer.weight.dtype == torch.int8 and layer.weight.SCB.dtype == torch.float32
    assert layer.state.CB.data_ptr() == layer.weight.data_ptr() and layer.state.SCB is layer.weight.SCB
    layer.float()
    assert layer.weight.dtype == torch.int8 and layer.bias.dtype == torch.float32


def test_first_forward_quantizes_a_frozen_layer():
    layer = _frozen_layer(seed=6)
    w = layer.weight.detach().clone()
    x = torch.randn(4, 64, generator=_gen(7))
    y = layer(x)
    assert layer.weight.dtype == torch.int8
    assert relative_error(y, torch.nn.functional.linear(x, w, layer.bias)) < INT8_MATMUL_REL_ERR


def test_deepcopy_keeps_the_quantization():
    layer = _frozen_layer(seed=8).to("cpu")
    twin = copy.deepcopy(layer)
    assert isinstance(twin.weight, Int8Params) and twin.weight.dtype == torch.int8
    assert twin.weight.SCB is not layer.weight.SCB and torch.equal(twin.weight.SCB, layer.weight.SCB)
    x = torch.randn(3, 64, generator=_gen(9))
    assert torch.equal(twin(x), layer(x))


def test_pickling_a_whole_module_keeps_int8params(tmp_path):
    layer = _frozen_layer(seed=30).to("cpu")
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert isinstance(loaded.weight, Int8Params) and loaded.weight.dtype == torch.int8
    assert not loaded.weight.has_fp16_weights and torch.equal(loaded.weight.SCB, layer.weight.SCB)
    x = torch.randn(2, 64, generator=_gen(31))
    assert torch.equal(loaded(x), layer(x))


def test_detach_keeps_the_type_and_the_scales():
    param = _frozen_layer(seed=32).to("cpu").weight
    alias = param.detach()
    assert isinstance(alias, Int8Params) and alias.dtype == torch.int8 and not alias.requires_grad
    assert alias.data_ptr() == param.data_ptr() and alias.SCB is param.SCB
    assert not alias.has_fp16_weights
    trainable = Int8Params(torch.randn(4, 8), requires_grad=True, has_fp16_weights=True).detach()
    assert isinstance(trainable, Int8Params) and trainable.has_fp16_weights and trainable.SCB is None


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_moves_that_rebuild_parameters_keep_int8params(quantized):
    layer = _frozen_layer(seed=33)
    if quantized:
        layer.to("cpu")
    on_meta = copy.deepcopy(layer).to("meta")  # Module.to rebuilds via Parameter(moved)
    assert isinstance(on_meta.weight, Int8Params) and on_meta.weight.device.type == "meta"
    assert on_meta.weight.dtype == (torch.int8 if quantized else torch.float32)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        rebuilt = copy.deepcopy(layer).to("cpu")
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert isinstance(rebuilt.weight, Int8Params) and rebuilt.weight.dtype == torch.int8
    x = torch.randn(2, 64, generator=_gen(34))
    assert torch.equal(rebuilt(x), layer.to("cpu")(x))


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_meta_construction_then_to_empty_and_load(quantized):
    source = _frozen_layer(seed=35)
    if quantized:
        source.to("cpu")
    with torch.device("meta"):
        layer = Linear8bitLt(64, 32, has_fp16_weights=False)
    assert isinstance(layer.weight, Int8Params) and layer.weight.device.type == "meta"
    layer.to_empty(device="cpu")  # the weight comes back from generic code as a plain tensor
    assert isinstance(layer.weight, Int8Params) and not layer.weight.has_fp16_weights
    layer.load_state_dict(source.state_dict())
    x = torch.randn(2, 64, generator=_gen(36))
    assert layer.weight.device.type == "cpu" and torch.equal(layer(x), source(x))
    assert layer.weight.dtype == torch.int8


def test_quantized_layer_through_meta_and_back():
    source = _frozen_layer(seed=37).to("cpu")
    layer = copy.deepcopy(source).to("meta").to_empty(device="cpu")
    assert isinstance(layer.weight, Int8Params) and layer.weight.dtype == torch.int8
    assert layer.weight.SCB.device.type == "cpu" and layer.weight.SCB.shape == (32,)
    layer.load_state_dict(source.state_dict())
    x = torch.randn(2, 64, generator=_gen(38))
    assert torch.equal(layer(x), source(x))


def test_embedding8bit_survives_meta_construction():
    torch.manual_seed(39)
    source = Embedding8bit(10, 16).to("cpu")
    with torch.device("meta"):
        table = Embedding8bit(10, 16)
    table.to_empty(device="cpu")
    table.load_state_dict(source.state_dict())
    index = torch.tensor([[1, 9], [0, 3]])
    assert isinstance(table.weight, Int8Params) and torch.equal(table(index), source(index))


def test_cb_reads_through_to_the_current_codes():
    param = _frozen_layer(seed=40).to("cpu").weight
    replacement = torch.randint(-127, 128, tuple(param.shape), dtype=torch.int8)
    param.data = replacement  # what generic code (and Module.to) does
    assert param.CB.data_ptr() == replacement.data_ptr()
    on_meta = param.to("meta")
    assert on_meta.CB.device.type == "meta" and param.CB.device.type == "cpu"
    float_param = Int8Params(torch.randn(4, 8), requires_grad=False)
    assert float_param.CB is None  # nothing quantized yet
    codes = torch.ones(4, 8, dtype=torch.int8)
    float_param.CB = codes  # bitsandbytes-style assignment installs the codes
    assert float_param.dtype == torch.int8 and float_param.data_ptr() == codes.data_ptr()
    with pytest.raises(kbit.KbitTypeError, match="CB"):
        float_param.CB = torch.ones(4, 8)


def test_state_reads_through_to_a_replaced_weight():
    layer = _frozen_layer(seed=41).to("cpu")
    other = _frozen_layer(seed=42).to("cpu")
    layer.weight = other.weight  # what bitsandbytes-style loaders do
    assert layer.state.CB.data_ptr() == other.weight.data_ptr() and layer.state.SCB is other.weight.SCB
    codes = torch.zeros(32, 64, dtype=torch.int8)
    layer.weight.data = codes
    assert layer.state.CB.data_ptr() == codes.data_ptr()


# ------------------------------------------------------------------------ Linear8bitLt
@pytest.mark.parametrize("has_fp16_weights", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_forward_matches_float_linear(has_fp16_weights, dtype):
    torch.manual_seed(10)
    reference = torch.nn.Linear(128, 48)
    layer = Linear8bitLt(128, 48, has_fp16_weights=has_fp16_weights)
    layer.load_state_dict(reference.state_dict())
    layer.to("cpu")
    x = torch.randn(2, 5, 128, generator=_gen(11)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 5, 48)
    assert relative_error(y, reference(x.float())) < INT8_MATMUL_REL_ERR


def test_threshold_routes_outlier_columns_through_16bit():
    torch.manual_seed(12)
    reference = torch.nn.Linear(256, 64)
    x = torch.randn(16, 256, generator=_gen(13))
    x[:, [7, 99]] *= 60
    errors = {}
    for threshold in (0.0, 6.0):
        layer = Linear8bitLt(256, 64, has_fp16_weights=False, threshold=threshold)
        layer.load_state_dict(reference.state_dict())
        errors[threshold] = relative_error(layer(x), reference(x))
        if threshold:
            assert layer.state.idx.tolist() == [7, 99] and layer.state.use_pool
    assert errors[6.0] < INT8_MATMUL_REL_ERR and errors[0.0] > 4 * errors[6.0]


def test_state_dict_of_a_trainable_layer_is_plain():
    layer = Linear8bitLt(8, 4, has_fp16_weights=True).to("cpu")
    saved = layer.state_dict()
    assert list(saved) == ["weight", "bias"] and saved["weight"].dtype == torch.float32


def test_int8_checkpoint_loads_dequantized_into_a_trainable_layer():
    frozen = _frozen_layer(seed=14).to("cpu")
    trainable = Linear8bitLt(64, 32, has_fp16_weights=True)
    trainable.load_state_dict(frozen.state_dict())
    assert trainable.weight.dtype == torch.float32 and trainable.weight.requires_grad
    expected = F.int8_vectorwise_dequant(frozen.weight.data, frozen.weight.SCB)
    assert torch.equal(trainable.weight.data, expected)


def test_float_checkpoint_loads_quantized_into_a_quantized_layer():
    torch.manual_seed(15)
    reference = torch.nn.Linear(64, 32)
    layer = _frozen_layer(seed=16).to("cpu")
    layer.load_state_dict(reference.state_dict())
    CB, SCB, _ = F.int8_vectorwise_quant(reference.weight.detach())
    assert torch.equal(layer.weight.data, CB) and torch.equal(layer.weight.SCB, SCB)
    assert torch.equal(layer.bias.data, reference.bias.data)


def test_round_trip_between_quantized_modules():
    source = _frozen_layer(seed=17).to("cpu")
    target = _frozen_layer(seed=18).to("cpu")
    target.load_state_dict(source.state_dict())
    x = torch.randn(3, 64, generator=_gen(19))
    assert torch.equal(target(x), source(x))


def test_nested_module_state_dict_round_trip():
    def model():
        return torch.nn.Sequential(torch.nn.Linear(16, 64), Linear8bitLt(64, 8, has_fp16_weights=False))

    torch.manual_seed(20)
    source = model().to("cpu")
    target = model()
    result = target.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 16, generator=_gen(21))
    assert torch.equal(target(x), source(x))


def _bad(state_dict, **changes):
    bad = dict(state_dict)
    for key, value in changes.items():
        if value is None:
            bad.pop(key)
        else:
            bad[key] = value
    return bad


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(SCB=None), "SCB"),
        (dict(SCB=torch.ones(31)), "SCB"),
        (dict(SCB=torch.ones(32, dtype=torch.int32)), "SCB"),
        (dict(weight_format=torch.tensor(2, dtype=torch.uint8)), "weight_format"),
        (dict(weight=torch.zeros(32, 63, dtype=torch.int8)), "weight"),
        (dict(weight=torch.zeros(32, 64, dtype=torch.int32)), "weight"),
    ],
)
def test_malformed_checkpoint_raises_and_leaves_the_module_untouched(changes, key):
    source = _frozen_layer(seed=22).to("cpu").state_dict()
    target = _frozen_layer(seed=23)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(kbit.QuantStateError, match=key):
        target.load_state_dict(_bad(source, **changes))
    after = target.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_bad_constructor_threshold():
    with pytest.raises(kbit.KbitValueError, match="threshold"):
        Linear8bitLt(4, 4, threshold=-1.0)


@pytest.mark.parametrize("has_fp16_weights, threshold", [(False, 0.0), (True, 0.0), (False, 6.0)])
def test_compiled_forward_matches_eager(has_fp16_weights, threshold):
    torch.manual_seed(24)
    layer = Linear8bitLt(64, 32, has_fp16_weights=has_fp16_weights, threshold=threshold).to("cpu")
    x = torch.randn(6, 64, generator=_gen(25))
    x[:, 10] *= 30
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x), eager)


def test_compiled_thresholded_forward_follows_the_outlier_columns():
    # One compiled graph serves inputs with different numbers of outlier columns.
    torch.manual_seed(45)
    layer = Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0).to("cpu")
    compiled = torch.compile(layer, fullgraph=True)
    for rows, columns in ((6, [10]), (6, []), (3, [1, 2, 3, 40]), (9, list(range(64)))):
        x = torch.randn(rows, 64, generator=_gen(46))
        x[:, columns] *= 30
        assert torch.equal(compiled(x), layer(x))
        assert layer.state.idx.tolist() == columns


def test_layer_state_mirrors_the_layer():
    torch.manual_seed(47)
    frozen = Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0).to("cpu")
    state = frozen.state
    assert state.CB.data_ptr() == frozen.weight.data_ptr() and state.SCB is frozen.weight.SCB
    assert state.threshold == 6.0 and not state.has_fp16_weights and state.idx is None
    frozen.eval()
    x = torch.randn(4, 64, generator=_gen(48))
    x[:, 8] *= 40
    frozen(x)
    assert not state.is_training and state.idx.tolist() == [8]
    trainable = Linear8bitLt(64, 32, has_fp16_weights=True)
    trainable(x)
    CB, SCB, _ = F.int8_vectorwise_quant(trainable.weight.detach())
    assert trainable.state.has_fp16_weights and trainable.state.is_training
    assert torch.equal(trainable.state.CB, CB) and torch.equal(trainable.state.SCB, SCB)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_layer_gradients_are_float_linear_gradients(threshold):
    # Straight-through: with a fixed upstream gradient G, grad_x = G @ W, grad_W = G.T @ x
    # exactly; a frozen layer passes G through its dequantized codes and gets no weight grad.
    torch.manual_seed(49)
    reference = torch.nn.Linear(64, 32)
    x = torch.randn(2, 5, 64, generator=_gen(50))
    x[..., 3] *= 30
    G = torch.randn(2, 5, 32, generator=_gen(51))
    trainable = Linear8bitLt(64, 32, has_fp16_weights=True, threshold=threshold)
    trainable.load_state_dict(reference.state_dict())
    xs = [x.clone().requires_grad_() for _ in range(3)]
    (trainable(xs[0]) * G).sum().backward()
    (reference(xs[1]) * G).sum().backward()
    for got, want in ((xs[0].grad, xs[1].grad), (trainable.weight.grad, reference.weight.grad), (trainable.bias.grad, reference.bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    frozen = Linear8bitLt(64, 32, has_fp16_weights=False, threshold=threshold)
    frozen.load_state_dict(reference.state_dict())
    (frozen(xs[2]) * G).sum().backward()
    dequantized = F.int8_vectorwise_dequant(frozen.weight.data, frozen.weight.SCB)
    assert frozen.weight.grad is None and frozen.bias.grad is not None
    torch.testing.assert_close(xs[2].grad, G @ dequantized, rtol=1e-5, atol=1e-5)


def test_small_mlp_trains():
    torch.manual_seed(26)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x = torch.randn(256, 16, generator=_gen(27))
    with torch.no_grad():
        y = teacher(x)
    model = torch.nn.Sequential(
        Linear8bitLt(16, 64, has_fp16_weights=True), torch.nn.ReLU(), Linear8bitLt(64, 4, has_fp16_weights=True)
    ).to("cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])  # about 0.01 measured


# ----------------------------------------------------------------------- Embedding8bit
def test_embedding8bit_matches_float_embedding():
    torch.manual_seed(28)
    reference = torch.nn.Embedding(50, 24)
    embedding = Embedding8bit(50, 24)
    embedding.load_state_dict(reference.state_dict())
    assert embedding.weight.dtype == torch.float32  # quantized lazily
    index = torch.tensor([[0, 7, 49], [3, 3, 12]])
    out = embedding(index)
    assert embedding.weight.dtype == torch.int8
    assert out.shape == (2, 3, 24) and out.dtype == torch.float32
    expected = reference(index)
    assert torch.all((out - expected).abs() <= embedding.weight.SCB[index][..., None] / 254 * (1 + 1e-5))


def test_embedding8bit_save_and_load():
    torch.manual_seed(29)
    source = Embedding8bit(30, 8, dtype=torch.float16).to("cpu")
    saved = source.state_dict()
    assert list(saved) == ["weight", "SCB", "weight_format"] and saved["weight"].dtype == torch.int8
    target = Embedding8bit(30, 8, dtype=torch.float16)
    target.load_state_dict(saved)
    index = torch.arange(30)
    assert target(index).dtype == torch.float16 and torch.equal(target(index), source(index))


def test_embedding8bit_dtype_follows_casts_before_quantization():
    table = Embedding8bit(10, 16)
    table.half()
    assert table.dtype == torch.float16
    table.to("cpu")  # quantizes; the output keeps the dtype the table had
    assert table.weight.dtype == torch.int8 and table.dtype == torch.float16
    assert table(torch.tensor([1, 2])).dtype == torch.float16


# ------------------------------------------------------------------ saved checkpoints
@pytest.mark.parametrize(
    "make",
    [
        lambda: _frozen_layer(seed=43).to("cpu"),
        lambda: Linear8bitLt(64, 32, has_fp16_weights=True),
        lambda: Embedding8bit(20, 16).to("cpu"),
    ],
    ids=["Linear8bitLt-int8", "Linear8bitLt-trainable", "Embedding8bit"],
)
def test_state_dict_holds_plain_tensors_loadable_with_weights_only(make, tmp_path):
    # torch.load defaults to weights_only=True, which refuses kbit's parameter classes:
    # a saved state dict must hold plain tensors only.
    module = make()
    saved = module.state_dict()
    assert all(type(value) is torch.Tensor for value in saved.values()), {k: type(v) for k, v in saved.items()}
    torch.save(saved, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt")
    assert list(loaded) == list(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    twin = make()
    twin.load_state_dict(loaded)
    index = torch.tensor([[0, 5], [19, 2]])
    x = index if isinstance(module, Embedding8bit) else torch.randn(3, 64, generator=_gen(44))
    assert torch.equal(twin(x), module(x))
    # keep_vars=True still hands out the parameter itself (what optimizers and FSDP expect).
    assert module.state_dict(keep_vars=True)["weight"] is module.weight
