"""matmul_4bit: gradients through a frozen 4-bit weight, and QLoRA in miniature."""

import warnings

import pytest
import torch

import kbit
import kbit.functional as F
from kbit import KbitTypeError, KbitValueError, QuantStateError
from kbit.nn import LinearNF4, Params4bit


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Modules initialise their weights from the global RNG: make that deterministic too."""
    torch.manual_seed(0)


def _seeded(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _weight(out_features=24, in_features=64, quant_type="nf4", storage=torch.uint8):
    W = _seeded(out_features, in_features, seed=1)
    packed, state = F.quantize_4bit(W, quant_type=quant_type, compress_statistics=True, quant_storage=storage)
    return packed, state, F.dequantize_4bit(packed, state)


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (0, 64), (1, 64), (64,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_and_gradients_match_the_dequantized_weight(shape, dtype):
    packed, state, weight = _weight()
    weight = weight.to(dtype)
    x = _seeded(*shape, seed=2, dtype=dtype).requires_grad_()
    bias = _seeded(24, seed=3, dtype=dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    for B in (packed, packed.t()):  # stored orientation and bitsandbytes' weight.t()
        y = kbit.matmul_4bit(x, B, state, bias=bias)
        y_ref = torch.nn.functional.linear(x_ref, weight, bias_ref)  # one rounding, bias included
        assert y.shape == (*shape[:-1], 24) and y.dtype == dtype
        torch.testing.assert_close(y, y_ref)
        upstream = _seeded(*y.shape, seed=4, dtype=dtype)
        grad_x, grad_bias = torch.autograd.grad(y, (x, bias), upstream)
        grad_x_ref, grad_bias_ref = torch.autograd.grad(y_ref, (x_ref, bias_ref), upstream)
        torch.testing.assert_close(grad_x, grad_x_ref)
        torch.testing.assert_close(grad_bias, grad_bias_ref)


def test_out_buffer_and_no_bias():
    packed, state, weight = _weight(quant_type="fp4")
    x = _seeded(3, 64, seed=5)
    out = torch.empty(3, 24)
    assert kbit.matmul_4bit(x, packed, state, out=out) is out
    torch.testing.assert_close(out, x @ weight.T)


def test_weights_are_frozen():
    packed, state, _ = _weight(storage=torch.bfloat16)
    trainable = packed.clone().requires_grad_()  # possible only with a float storage dtype
    with pytest.raises(KbitValueError, match="frozen"):
        kbit.matmul_4bit(_seeded(2, 64), trainable, state)
    with torch.no_grad():  # inference never asks for the weight's gradient: fine
        kbit.matmul_4bit(_seeded(2, 64), trainable, state)
    layer = LinearNF4(64, 8).to("cpu")
    with pytest.raises(RuntimeError, match="floating point"):
        layer.weight.requires_grad_(True)  # uint8 codes cannot require a gradient at all
    trainable_float = Params4bit(torch.randn(8, 64), requires_grad=True, quant_type="nf4")
    with pytest.raises(KbitValueError, match="frozen"):
        trainable_float.to("cpu")
    assert trainable_float.shape == (8, 64) and not trainable_float.bnb_quantized  # left as it was


def test_bad_arguments():
    packed, state, _ = _weight()
    with pytest.raises(KbitValueError, match="in_features=64"):
        kbit.matmul_4bit(_seeded(2, 32), packed, state)
    with pytest.raises(KbitValueError, match="bias.shape"):
        kbit.matmul_4bit(_seeded(2, 64), packed, state, bias=torch.zeros(23))
    with pytest.raises(KbitTypeError, match="A has dtype torch.int64"):
        kbit.matmul_4bit(torch.ones(2, 64, dtype=torch.long), packed, state)
    with pytest.raises(QuantStateError, match="matmul_4bit: B: .*cannot hold"):
        kbit.matmul_4bit(_seeded(2, 64), packed[:-1], state)
    _, flat_state = F.quantize_4bit(_seeded(24 * 64), quant_type="nf4")
    with pytest.raises(KbitValueError, match="2-D"):
        kbit.matmul_4bit(_seeded(2, 64), packed, flat_state)


def test_bad_bias_and_out_are_rejected_before_any_work(monkeypatch):
    import kbit._ops.quant4 as quant4_ops

    calls = []
    for name in ("gemv_4bit", "matmul_4bit"):
        original = getattr(quant4_ops, name)
        monkeypatch.setattr(quant4_ops, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    packed, state, _ = _weight()
    x = _seeded(2, 64)
    with pytest.raises(KbitValueError, match="bias.shape"):
        kbit.matmul_4bit(x, packed, state, bias=torch.zeros(23))
    with pytest.raises(KbitTypeError, match="bias has dtype torch.int64"):
        kbit.matmul_4bit(x, packed, state, bias=torch.zeros(24, dtype=torch.long))
    with pytest.raises(KbitValueError, match="out"):
        kbit.matmul_4bit(x, packed, state, out=torch.empty(2, 23))
    assert not calls
    kbit.matmul_4bit(x, packed, state, bias=torch.zeros(24))
    assert calls  # the counter does see real work


class _LoRA(torch.nn.Module):
    """A frozen base layer plus a trainable low-rank update ``B @ A`` (B starts at zero)."""

    def __init__(self, base: torch.nn.Module, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / base.in_features**0.5)
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T


def test_qlora_in_miniature():
    """A frozen NF4 MLP learns a regression task through rank-4 adapters only."""
    generator = torch.Generator().manual_seed(0)
    sizes, rank = (32, 64, 8), 4

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    base = [randn(o, i) / i**0.5 for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    # The target differs from the base by a low-rank change the adapters can learn.
    delta = [randn(o, rank) @ randn(rank, i) / i**0.5 for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    X = randn(512, sizes[0])
    Y = torch.relu(X @ (base[0] + delta[0]).T) @ (base[1] + delta[1]).T

    layers = []
    for weight in base:
        frozen = LinearNF4(weight.shape[1], weight.shape[0], bias=False)
        frozen.load_state_dict({"weight": weight})  # quantized on load
        layers.append(_LoRA(frozen, rank, generator))
    model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for layer in layers for p in (layer.lora_A, layer.lora_B)}
    frozen_bytes = [layer.base.weight.data.clone() for layer in layers]

    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(model(X), Y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] * 10 <= losses[0], (losses[0], losses[-1])
    assert all(torch.equal(layer.base.weight.data, b) for layer, b in zip(layers, frozen_bytes, strict=True))


@pytest.mark.parametrize("orientation", ["stored", "transposed"])
def test_weight_quantized_as_in_out_still_multiplies_with_a_deprecation_warning(orientation):
    # Old code quantized W as [in_features, out_features] and computed A @ W.
    W = _seeded(64, 24, seed=6)  # [in, out]
    packed, state = F.quantize_4bit(W, quant_type="nf4")
    B = packed if orientation == "stored" else packed.t()
    x = _seeded(5, 64, seed=7).requires_grad_()
    bias = _seeded(24, seed=8)
    with pytest.warns(DeprecationWarning, match=r"\[64, 24\] = \[in_features, out_features\]"):
        y = kbit.matmul_4bit(x, B, state, bias=bias)
    dequantized = F.dequantize_4bit(packed, state)
    torch.testing.assert_close(y, x @ dequantized + bias)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, dequantized.sum(1).expand(5, 64))
    with pytest.raises(KbitValueError, match="bias.shape"):
        with pytest.warns(DeprecationWarning):
            kbit.matmul_4bit(x, B, state, bias=torch.zeros(64))


def test_a_square_weight_is_taken_as_out_in():
    # [K, K] cannot tell its orientation: it is read as torch.nn.Linear's [out, in], no warning.
    packed, state = F.quantize_4bit(_seeded(64, 64, seed=9), quant_type="nf4")
    x = _seeded(2, 64, seed=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        y = kbit.matmul_4bit(x, packed, state)
    torch.testing.assert_close(y, x @ F.dequantize_4bit(packed, state).T)
