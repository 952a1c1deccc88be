"""kbit's ``bitsandbytes`` compatibility package (plugins/bitsandbytes-compat).

What libraries probe when they import ``bitsandbytes``: the metadata version, the devices,
the optimizers' qualified names, the submodule import paths, and the
``torch.ops.bitsandbytes`` ops with bitsandbytes' schemas, served by kbit.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from importlib import metadata

import pytest
import torch
from torch.library import opcheck

import kbit
import kbit.functional as F
from tests._ecosystem import require_compat

bnb = require_compat()
ops = torch.ops.bitsandbytes


def _seeded(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------ what libraries probe
def test_metadata_version_is_the_api_level_transformers_accepts():
    from packaging.version import Version

    version = metadata.version("bitsandbytes")
    assert version == bnb.__version__ == "0.50.2+kbit"
    assert Version(version) >= Version("0.46.1")  # transformers' BITSANDBYTES_MIN_VERSION


def test_supported_torch_devices_follows_kbit_fallback_policy(monkeypatch):
    assert bnb.supported_torch_devices == {"cpu"} | (
        {torch.accelerator.current_accelerator().type} if torch.accelerator.is_available() else set()
    )
    # With fallback forbidden, only devices a backend declares count; on CPU the reference does.
    monkeypatch.setenv("KBIT_FALLBACK", "error")
    kbit.backends.reset()
    assert "cpu" in bnb.supported_torch_devices
    with pytest.raises(AttributeError, match="no attribute 'not_a_thing'"):
        bnb.not_a_thing


def test_submodules_are_the_kbit_modules():
    import bitsandbytes.autograd
    import bitsandbytes.cextension
    import bitsandbytes.functional
    import bitsandbytes.nn.modules
    import bitsandbytes.utils
    from bitsandbytes.nn.modules import Linear8bitLt, Params4bit

    assert bitsandbytes.functional is kbit.functional and bitsandbytes.nn.modules is kbit.nn.modules
    assert bitsandbytes.utils is kbit.utils and bitsandbytes.cextension is kbit.cextension
    assert bitsandbytes.autograd is kbit.autograd
    assert (Linear8bitLt, Params4bit) == (kbit.nn.Linear8bitLt, kbit.nn.Params4bit)
    assert bnb.matmul_4bit is kbit.matmul_4bit and "multi_backend" in bnb.features
    assert not bnb.cextension.COMPILED_WITH_CUDA  # nothing claims a CUDA library


def test_optimizers_carry_bitsandbytes_names_and_are_kbit_optimizers():
    from bitsandbytes.optim import AdamW, PagedAdamW8bit
    from bitsandbytes.optim.optimizer import GlobalOptimManager, Optimizer8bit

    bases = {"Optimizer8bit", "Optimizer1State", "Optimizer2State"}
    renamed = 0
    for name in kbit.optim.__all__:
        ours, theirs = getattr(bnb.optim, name), getattr(kbit.optim, name)
        if isinstance(ours, type) and issubclass(ours, torch.optim.Optimizer) and name not in bases:
            assert ours.__module__ == "bitsandbytes.optim" and ours.__bases__ == (theirs,)
            assert "bitsandbytes" in str(ours)  # the Trainer's test for its embedding override
            renamed += 1
        else:
            assert ours is theirs
    assert renamed >= 40 and bnb.optim.__all__ == kbit.optim.__all__
    assert GlobalOptimManager is kbit.optim.GlobalOptimManager  # one singleton for both names
    model = torch.nn.Linear(64, 64)
    optimizer = AdamW(model.parameters(), optim_bits=8)
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    assert isinstance(optimizer, Optimizer8bit) and optimizer.state[model.weight]["state1"].dtype == torch.uint8
    assert PagedAdamW8bit.__init__ is kbit.optim.PagedAdamW8bit.__init__


def test_other_bitsandbytes_metadata_is_reported(monkeypatch):
    from bitsandbytes import _guard

    monkeypatch.setattr(_guard.metadata, "version", lambda name: "0.50.2")
    with pytest.warns(kbit.KbitWarning, match="two environments are mixed"):
        _guard.report_other_distribution("0.50.2+kbit")
    monkeypatch.setattr(_guard.metadata, "version", lambda name: "0.50.2+kbit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _guard.report_other_distribution("0.50.2+kbit")


# ---------------------------------------------------------------- torch.ops.bitsandbytes
def test_every_op_has_the_bitsandbytes_schema():
    from bitsandbytes._ops import SCHEMAS

    for name, schema in SCHEMAS.items():
        op_name, _, overload = name.partition(".")
        op = getattr(getattr(ops, op_name), overload or "default")
        assert op._schema == torch._C.parse_schema(f"bitsandbytes::{name}{schema}")


def test_4bit_ops_match_kbit():
    A = _seeded(48, 128, seed=1, dtype=torch.bfloat16)
    packed, absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    expected_packed, state = F.quantize_4bit(A, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, expected_packed) and torch.equal(absmax, state.absmax)
    weight = ops.dequantize_4bit(packed, absmax, 64, "nf4", [48, 128], torch.bfloat16)
    assert torch.equal(weight, F.dequantize_4bit(packed, state))
    out = torch.empty(48, 128, dtype=torch.bfloat16)
    ops.dequantize_4bit.out(packed, absmax, 64, "nf4", [48, 128], torch.bfloat16, out)
    assert torch.equal(out, weight)
    x = _seeded(3, 128, seed=2, dtype=torch.bfloat16).requires_grad_()
    bias = _seeded(48, seed=3, dtype=torch.bfloat16).requires_grad_()
    y = ops.gemm_4bit(x, packed, [48, 128], absmax, 64, "nf4", bias)
    assert torch.equal(y, kbit.matmul_4bit(x, packed, state, bias=bias))
    grad_x, grad_bias = torch.autograd.grad(y.sum(), (x, bias))
    torch.testing.assert_close(grad_x, weight.sum(0).expand(3, 128))
    assert torch.equal(grad_bias, torch.full((48,), 3.0, dtype=torch.bfloat16))
    row = x[:1].detach()
    code = F.get_4bit_type("nf4")
    assert torch.equal(ops.gemv_4bit(row, packed, [48, 128], absmax, code, 64), kbit.matmul_4bit(row, packed, state))
    with pytest.raises(kbit.KbitValueError, match="neither NF4 nor FP4"):
        ops.gemv_4bit(row, packed, [48, 128], absmax, code.flip(0), 64)


def test_gemm_4bit_with_nested_absmax():
    A = _seeded(64, 128, seed=4)
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type="fp4", compress_statistics=True)
    x = _seeded(5, 128, seed=5)
    nested = state.state2
    y = ops.gemm_4bit(x, packed, [64, 128], nested.absmax, 64, "fp4", None, state.absmax, nested.code, state.offset)
    assert torch.equal(y, kbit.matmul_4bit(x, packed, state))


def test_blockwise_and_int8_ops_match_kbit():
    A = _seeded(10, 300, seed=6)
    code = F.create_dynamic_map()
    codes, absmax = ops.quantize_blockwise(A, code, 256)
    expected, state = F.quantize_blockwise(A, code=code, blocksize=256)
    assert torch.equal(codes, expected) and torch.equal(absmax, state.absmax)
    assert torch.equal(ops.dequantize_blockwise(codes, absmax, code, 256, torch.float32), F.dequantize_blockwise(codes, state))
    CA, stats, outliers = ops.int8_vectorwise_quant(A)
    assert outliers is None and torch.equal(CA, F.int8_vectorwise_quant(A)[0])
    _, _, outliers = ops.int8_vectorwise_quant(A * 10, 6.0)
    assert outliers.dtype == torch.int64 and outliers.numel() > 0
    CB, SCB, _ = F.int8_vectorwise_quant(_seeded(16, 300, seed=7))
    product = ops.int8_linear_matmul(CA, CB)
    assert torch.equal(product, F.int8_linear_matmul(CA, CB))
    scaled = ops.int8_scaled_mm(CA, CB, stats, SCB, None, torch.float32)
    assert torch.equal(scaled, F.int8_mm_dequant(product, stats, SCB, dtype=torch.float32))
    assert ops.int8_mm_dequant(product, stats, SCB).dtype == torch.float16  # bitsandbytes' default
    assert torch.equal(ops.int8_vectorwise_dequant(CA, stats), F.int8_vectorwise_dequant(CA, stats))
    assert ops.int8_double_quant(A)[4] is None and len(ops.int8_double_quant(A, 1.0)) == 5
    out, sub = ops.int8_mixed_scaled_mm(A, CA, CB, stats, SCB, None, None)
    assert out.shape == (10, 16) and sub.shape[0] == 10


def test_optimizer_ops_update_in_place_like_kbit():
    p, g = _seeded(4096, seed=8), _seeded(4096, seed=9)
    p_ref, state_ref = p.clone(), torch.zeros(4096)
    state = torch.zeros(4096)
    # eps: bitsandbytes' SGD passes one; momentum does not read it, so it is ignored.
    ops.optimizer_update_32bit("momentum", g, p, state, None, None, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 1e-8, 0.0, 1, 0.1, 1.0)
    F.optimizer_update_32bit("momentum", g, p_ref, state_ref, 0.9, 0.0, 1, 0.1)
    assert torch.equal(p, p_ref) and torch.equal(state, state_ref)
    qmap1, qmap2 = F.create_dynamic_map(), F.create_dynamic_map(signed=False)
    s1, s2 = torch.zeros(4096, dtype=torch.uint8), torch.zeros(4096, dtype=torch.uint8)
    a1, a2 = torch.zeros(16), torch.zeros(16)
    r1, r2, ra1, ra2, p_ref = s1.clone(), s2.clone(), a1.clone(), a2.clone(), p.clone()
    ops.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-3, qmap1, qmap2, a1, a2, 0.0, 1.0)
    F.optimizer_update_8bit_blockwise("adam", g, p_ref, r1, r2, 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-3, qmap1, qmap2, ra1, ra2)
    assert torch.equal(p, p_ref) and torch.equal(s1, r1) and torch.equal(a2, ra2)


@pytest.mark.parametrize(
    "name, args",
    [
        ("quantize_4bit", lambda: (_seeded(8, 64), 64, "nf4", torch.uint8)),
        ("quantize_blockwise", lambda: (_seeded(8, 64), F.create_dynamic_map(), 256)),
        ("int8_vectorwise_dequant", lambda: (torch.ones(4, 8, dtype=torch.int8), torch.ones(4))),
        ("int8_linear_matmul", lambda: (torch.ones(4, 8, dtype=torch.int8), torch.ones(3, 8, dtype=torch.int8))),
    ],
)
def test_ops_pass_opcheck(name, args):
    opcheck(getattr(ops, name).default, args(), test_utils=("test_schema", "test_faketensor"))


def test_a_kernel_registered_for_a_device_takes_precedence():
    # Vendor code registers its own kernels for bitsandbytes ops; ours stays the default.
    library = torch.library.Library("bitsandbytes", "FRAGMENT")
    try:
        torch.library.register_kernel(
            "bitsandbytes::int8_vectorwise_dequant", "cpu", lambda A, stats: torch.full(A.shape, 7.0), lib=library
        )
        assert bool((ops.int8_vectorwise_dequant(torch.ones(2, 2, dtype=torch.int8), torch.ones(2)) == 7.0).all())
    finally:
        library._destroy()
    assert ops.int8_vectorwise_dequant(torch.full((2, 2), 127, dtype=torch.int8), torch.ones(2)).eq(1.0).all()


def test_import_in_a_fresh_interpreter_probes_nothing():
    code = (
        "import sys, bitsandbytes\n"
        "from kbit.backends._registry import REGISTRY\n"
        "print(REGISTRY._records is None, 'cupy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"], "importing bitsandbytes discovered backends or imported cupy"
    assert importlib.import_module("bitsandbytes") is bnb
