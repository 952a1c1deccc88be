"""The NumPy plugin (plugins/kbit-numpy) through the conformance suite, in-process.

The plugin is not installed in the development environment; its package is imported from
the source tree and its manifest registered by the conformance class (``manifest = ...``),
which is what a backend author does before packaging. The installed wheel is tested end to
end in test_plugin_e2e.py.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kbit
import kbit.functional as F
from kbit.testing import BackendConformance

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "kbit-numpy"


def _import_source_package(name: str, directory: Path) -> None:
    """Import package ``name`` from ``directory`` without putting the directory on sys.path.

    Putting the plugin's folder on ``sys.path`` would also expose a ``kbit_numpy.egg-info``
    left there by an editable install, and with it an entry point every later test's
    discovery would pick up.
    """
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        name, directory / name / "__init__.py", submodule_search_locations=[str(directory / name)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_import_source_package("kbit_numpy", PLUGIN)

from kbit_numpy import _kernels  # noqa: E402
from kbit_numpy._manifest import MANIFEST  # noqa: E402
from kbit_numpy.backend import NumpyBackend  # noqa: E402


class TestNumpyConformance(BackendConformance):
    backend = "numpy"
    device = "cpu"
    manifest = MANIFEST


@pytest.fixture
def numpy_backend():
    # replace=True: an installed copy of the plugin is discovered (disabled for the tests).
    kbit.backends.register(MANIFEST, replace=True)


def test_outranks_the_reference_for_what_it_declares(numpy_backend):
    assert kbit.backends.resolve("quantize_blockwise", "cpu", torch.float16, blocksize=64).name == "numpy"
    bf16 = kbit.backends.resolve("quantize_blockwise", "cpu", torch.bfloat16, blocksize=64)
    assert bf16.name == "reference" and bf16.rejected == (("numpy", "dtype bfloat16 not in declared ['float16', 'float32']"),)
    assert kbit.backends.resolve("estimate_quantiles", "cpu", torch.float32).name == "reference"


def test_public_api_round_trip_runs_on_numpy(numpy_backend):
    A = torch.randn(3, 1000, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    codes, state = F.quantize_blockwise(A, blocksize=256)
    with kbit.backends.use_backend("reference"):
        ref_codes, ref_state = F.quantize_blockwise(A, blocksize=256)
    assert torch.equal(codes, ref_codes) and torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(F.dequantize_blockwise(codes, state), F.dequantize_blockwise(ref_codes, ref_state, backend="reference"))


def test_whole_tensor_quantize_of_an_empty_tensor_has_one_absmax(numpy_backend):
    codes, (absmax, code) = F.quantize(torch.empty(0, 3), backend="numpy")
    assert codes.shape == (0, 3) and absmax.shape == (1,) and absmax.tolist() == [0.0]
    assert F.dequantize(codes, (absmax, code), backend="numpy").shape == (0, 3)


def test_nearest_code_index_handles_duplicates_unsorted_tables_and_nan():
    # A table padded with zeros holds 0 several times (indices 1..3): the lowest index wins.
    code = np.array([-1.0, 0.0, 0.0, 0.0, 0.5, 1.0], dtype=np.float32)
    values = np.array([0.0, 1e-9, -1e-9, 0.25, 0.2501, 2.0, -2.0, np.nan], dtype=np.float32)
    assert _kernels.nearest_code_index(values, code).tolist() == [1, 1, 1, 1, 4, 5, 0, 5]
    # An unsorted table (as FP4's): indices refer to the table as given, and a tie goes to
    # the lower index, not the lower value (0.25 is halfway between 0.0 at 2 and 0.5 at 0).
    table = np.array([0.5, -1.0, 0.0, 1.0], dtype=np.float32)
    values = np.array([0.25, 0.24, 0.26, -0.6, 0.9, -0.5], dtype=np.float32)
    assert _kernels.nearest_code_index(values, table).tolist() == [0, 2, 0, 1, 3, 1]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=str)
def test_4bit_public_api_runs_on_numpy_and_matches_the_reference(numpy_backend, quant_type, storage):
    A = torch.randn(33, 97, generator=torch.Generator().manual_seed(7), dtype=torch.float16)
    args = {"blocksize": 128, "quant_type": quant_type, "quant_storage": storage}
    assert kbit.backends.resolve("quantize_4bit", "cpu", A.dtype, **args).name == "numpy"
    packed, state = F.quantize_4bit(A, **args)
    ref_packed, ref_state = F.quantize_4bit(A, backend="reference", **args)
    assert packed.dtype == storage and torch.equal(packed.view(torch.uint8), ref_packed.view(torch.uint8))
    assert torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(F.dequantize_4bit(packed, state), F.dequantize_4bit(packed, state, backend="reference"))


def test_4bit_undeclared_variants_go_elsewhere(numpy_backend):
    args = {"blocksize": 64, "quant_type": "nf4", "quant_storage": torch.uint8}
    # NumPy has no bfloat16 input dtype, and the 4-bit products are not implemented.
    assert kbit.backends.resolve("quantize_4bit", "cpu", torch.bfloat16, **args).name == "reference"
    assert kbit.backends.resolve("gemv_4bit", "cpu", torch.float32, **args).name == "reference"
    # A bfloat16 *storage* is only a view of the bytes: served.
    args["quant_storage"] = torch.bfloat16
    assert kbit.backends.resolve("dequantize_4bit", "cpu", torch.float32, **args).name == "numpy"


def test_kbit_check_covers_every_declared_op(numpy_backend):
    from kbit._selftest import run_checks

    results = run_checks(kbit.backends.get("numpy"), kbit.backends.get("reference"))
    assert {r.op for r in results} == set(MANIFEST.ops)
    assert all(r.status == "passed" for r in results), results


class WrongNoAbsmax(NumpyBackend):
    """The numpy backend with code-only quantization one code too high."""

    def quantize_no_absmax(self, A, *, code):
        return (super().quantize_no_absmax(A, code=code).int() + 1).clamp(max=255).to(torch.uint8)


def test_kbit_check_catches_a_wrong_op_through_the_conformance_cases():
    from kbit._selftest import run_checks

    kbit.backends.register(MANIFEST.model_copy(update={"name": "wrongnp", "factory": f"{__name__}:WrongNoAbsmax"}))
    results = {r.op: r for r in run_checks(kbit.backends.get("wrongnp"), kbit.backends.get("reference"))}
    assert results["quantize_no_absmax"].status == "failed"
    assert "quantize_no_absmax-float32" in results["quantize_no_absmax"].detail
    assert all(r.status == "passed" for op, r in results.items() if op != "quantize_no_absmax")
