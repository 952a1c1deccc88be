"""Import hygiene and the public surface."""

import importlib
import inspect
import subprocess
import sys

import pytest

import kbit

PUBLIC_MODULES = [
    "kbit",
    "kbit.functional",
    "kbit.backends",
    "kbit.backend",
    "kbit.nn",
    "kbit.nn.modules",
    "kbit.utils",
    "kbit.cextension",
    "kbit.autograd",
    "kbit.optim",
    "kbit.testing",
    "kbit.testing.tolerances",
]


def test_import_kbit_imports_no_backend_and_no_cupy():
    script = (
        "import sys, kbit, kbit.functional, kbit.nn, kbit.optim, kbit.autograd\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'kbit_reference', 'kbit_cuda'))\n"
        "print(bad)\n"
        "from kbit.backends._registry import REGISTRY\n"
        "print(REGISTRY._records is None)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", f"import kbit pulled in backend modules: {out[0]}"
    assert out[1] == "True", "import kbit ran backend discovery"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_is_complete_and_documented(module_name):
    module = importlib.import_module(module_name)
    exported = set(module.__all__)
    # Everything defined in the module or in one of its private submodules is public API.
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and (value.__module__ == module_name or value.__module__.startswith(module_name + "._"))
    }
    assert public <= exported, f"missing from {module_name}.__all__: {sorted(public - exported)}"
    for name in exported:
        value = getattr(module, name)
        if callable(value) or inspect.isclass(value):
            assert inspect.getdoc(value), f"{module_name}.{name} has no docstring"


def test_version_and_features():
    assert kbit.__version__.count(".") == 2
    assert "multi_backend" in kbit.features


def test_bitsandbytes_style_import():
    import kbit as bnb

    assert bnb.functional.quantize_blockwise is kbit.functional.quantize_blockwise
