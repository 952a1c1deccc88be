"""Embedding4bit: row-wise lookups of a 4-bit table, fallback, state dicts."""

import pytest
import torch

import kbit.functional as F
import kbit.nn._embedding4bit as embedding_module
from kbit.nn import Embedding4bit, EmbeddingFP4, EmbeddingNF4


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Modules initialise their weights from the global RNG: make that deterministic too."""
    torch.manual_seed(0)


def _indices(*shape, high, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def _full_table(module):
    return F.dequantize_4bit(module.weight, module.weight.quant_state)


@pytest.fixture
def dequantize_calls(monkeypatch):
    """Shapes of every dequantize_4bit call the embedding module makes."""
    shapes = []

    def recording(A, quant_state=None, *args, **kwargs):
        shapes.append(tuple(quant_state.shape))
        return F.dequantize_4bit(A, quant_state, *args, **kwargs)

    monkeypatch.setattr(embedding_module, "dequantize_4bit", recording)
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("storage", [torch.uint8, torch.float32], ids=str)
def test_lookup_dequantizes_only_the_requested_rows(dtype, storage, dequantize_calls):
    module = Embedding4bit(100, 128, dtype=dtype, quant_type="nf4", quant_storage=storage).to("cpu")
    table = _full_table(module)
    dequantize_calls.clear()
    index = _indices(3, 5, high=100)
    out = module(index)
    assert out.shape == (3, 5, 128) and out.dtype == dtype
    assert torch.equal(out, torch.nn.functional.embedding(index, table))
    assert dequantize_calls == [(15, 128)]  # 15 rows looked up, not the 100-row table


def test_nested_states_and_fp4_work_row_wise(dequantize_calls):
    module = EmbeddingFP4(50, 64)
    module.weight.compress_statistics = True  # e.g. a checkpoint saved with nested absmax
    index = _indices(7, high=50, seed=1)
    out = module(index)  # quantizes on first forward
    assert module.weight.quant_state.nested and module.weight.quant_type == "fp4"
    assert torch.equal(out, torch.nn.functional.embedding(index, _full_table(module)))
    assert dequantize_calls[0] == (7, 64)


def test_rows_that_are_not_whole_blocks_fall_back_to_the_full_table(dequantize_calls):
    module = EmbeddingNF4(30, 40)  # 40 is not a multiple of the blocksize 64
    index = _indices(4, high=30, seed=2)
    out = module(index)
    assert dequantize_calls == [(30, 40)]
    assert torch.equal(out, torch.nn.functional.embedding(index, _full_table(module)))


def test_quality_and_state_dict_round_trip():
    module = EmbeddingNF4(64, 256).to("cpu")
    original = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    module.load_state_dict({"weight": original})  # float table: quantized on load
    assert (module(torch.arange(64)) - original).abs().mean() < 0.08
    state = module.state_dict()
    assert list(state) == [
        "weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"
    ]  # fmt: skip
    fresh = EmbeddingNF4(64, 256)
    fresh.load_state_dict(state)
    index = _indices(9, high=64, seed=4)
    assert torch.equal(fresh(index), module(index))


def test_empty_lookup():
    module = EmbeddingNF4(10, 64)
    assert module(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 64)


def test_dtype_follows_the_weight_after_casts_and_loads():
    table = Embedding4bit(8, 64)
    table.half()  # before quantization a cast changes the float table, and so the output dtype
    assert table.dtype == torch.float16
    table.to("cpu")
    assert table.dtype == torch.float16 and table(torch.tensor([1, 2])).dtype == torch.float16
    bf16 = Embedding4bit(8, 64, dtype=torch.bfloat16).to("cpu")
    table.load_state_dict(bf16.state_dict())
    assert table.dtype == torch.bfloat16 and table(torch.tensor([3])).dtype == torch.bfloat16
