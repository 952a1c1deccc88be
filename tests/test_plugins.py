"""Discovery through entry points: a broken plugin never breaks kbit."""

import subprocess
import sys
import warnings

import pytest
import torch

import kbit
import kbit.functional as F

# A minimal working backend: the reference 8-bit ops under another name.
GOOD_PLUGIN = """
    from kbit.backend import API_VERSION, BackendManifest, OpSupport
    from kbit_reference.backend import ReferenceBackend

    class Backend(ReferenceBackend):
        pass

    MANIFEST = BackendManifest(
        name="{name}", api_version=API_VERSION, priority={priority}, device_types=("cpu",),
        factory="{dist}_pkg.manifest:Backend",
        ops={{"quantize_blockwise": OpSupport(dtypes=("float32",), blocksizes=(64, 256))}},
    )
"""

FAILURE_MODES = {
    # module raises on import
    "import_error": ("invalid", "ModuleNotFoundError", "import not_a_real_module_xyz\nMANIFEST = None\n"),
    # module calls sys.exit() on import (a CLI entry module registered by mistake)
    "exits_on_import": ("invalid", "SystemExit", "import sys\nsys.exit('no driver')\nMANIFEST = None\n"),
    # manifest fails validation (unknown field)
    "bad_manifest": (
        "invalid",
        "ValidationError",
        """
        MANIFEST = {"name": "bad_manifest", "api_version": 1, "device_types": ["cpu"],
                    "factory": "x.y:Z", "ops": {}, "colour": "red"}
        """,
    ),
    # manifest built for another backend API version
    "wrong_api": (
        "invalid",
        "API version 99",
        """
        MANIFEST = {"name": "wrong_api", "api_version": 99, "device_types": ["cpu"],
                    "factory": "x.y:Z", "ops": {}}
        """,
    ),
    # factory raises when the backend is built
    "factory_raises": (
        "invalid",
        "RuntimeError: driver exploded",
        """
        from kbit.backend import API_VERSION, BackendManifest

        def make():
            raise RuntimeError("driver exploded")

        MANIFEST = BackendManifest(name="factory_raises", api_version=API_VERSION,
                                   device_types=("cpu",), factory="factory_raises_pkg.manifest:make", ops={})
        """,
    ),
    # is_available raises
    "probe_raises": (
        "unavailable",
        "OSError: no such device",
        """
        from kbit.backend import API_VERSION, Backend, BackendManifest

        class Broken(Backend):
            def is_available(self):
                raise OSError("no such device")

        MANIFEST = BackendManifest(name="probe_raises", api_version=API_VERSION, priority=50,
                                   device_types=("cpu",), factory="probe_raises_pkg.manifest:Broken", ops={})
        """,
    ),
}


@pytest.mark.parametrize("mode", sorted(FAILURE_MODES))
def test_broken_plugin_is_quarantined(make_plugin, mode):
    state, reason_fragment, source = FAILURE_MODES[mode]
    make_plugin(mode, mode, source)
    with pytest.warns(kbit.KbitPluginWarning, match=mode):
        records = {r.name: r for r in kbit.backends.list()}
    assert records[mode].state == state
    assert reason_fragment in records[mode].reason
    assert records[mode].distribution == mode and records[mode].version == "1.0"
    # kbit keeps working on the reference backend.
    codes, state_ = F.quantize_blockwise(torch.randn(100), blocksize=64)
    assert F.dequantize_blockwise(codes, state_).shape == (100,)
    # Warned once only.
    with warnings.catch_warnings():
        warnings.simplefilter("error", kbit.KbitPluginWarning)
        kbit.backends.list()
    # Naming it explicitly turns its failure into a clear error.
    error = kbit.BackendUnavailableError
    with pytest.raises(error, match=f"{mode}.*{state}"):
        with kbit.backends.use_backend(mode):
            F.quantize_blockwise(torch.randn(100), blocksize=64)


@pytest.mark.parametrize("mode", sorted(FAILURE_MODES))
def test_named_broken_plugin_in_env_raises(make_plugin, monkeypatch, mode):
    # Every failure mode, named in KBIT_BACKEND, is an error naming the plugin, its state
    # and the original error (never a silent fallback to the reference backend).
    state, reason_fragment, source = FAILURE_MODES[mode]
    make_plugin(mode, mode, source)
    monkeypatch.setenv("KBIT_BACKEND", mode)
    with pytest.warns(kbit.KbitPluginWarning, match=mode):
        with pytest.raises(kbit.BackendUnavailableError, match=f"{mode}.*{state}") as info:
            F.quantize_blockwise(torch.randn(10), blocksize=64)
    assert reason_fragment in str(info.value)


def test_import_kbit_survives_a_broken_plugin(make_plugin):
    site = make_plugin("import_error", "import_error", FAILURE_MODES["import_error"][2])
    script = (
        "import kbit, kbit.functional as F, torch, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "F.quantize_blockwise(torch.randn(10), blocksize=64)\n"
        "print({r.name: r.state for r in kbit.backends.list()}['import_error'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env_with_path(site), check=True
    )
    assert result.stdout.strip() == "invalid"


def test_good_plugin_is_discovered_and_ranked(make_plugin):
    make_plugin("goodplug", "goodplug", GOOD_PLUGIN.format(name="goodplug", dist="goodplug", priority=10))
    record = {r.name: r for r in kbit.backends.list()}["goodplug"]
    assert record.state == "available" and record.ops == ("quantize_blockwise",)
    # Higher priority than the reference, so it serves what it declares...
    assert kbit.backends.resolve("quantize_blockwise", "cpu", torch.float32, blocksize=64).name == "goodplug"
    # ...and the reference serves the rest, with the reason recorded.
    other = kbit.backends.resolve("quantize_blockwise", "cpu", torch.float16, blocksize=64)
    assert other.name == "reference" and not other.fallback
    assert other.rejected == (("goodplug", "dtype float16 not in declared ['float32']"),)


def test_disable_plugins(make_plugin, monkeypatch):
    make_plugin("goodplug2", "goodplug2", GOOD_PLUGIN.format(name="goodplug2", dist="goodplug2", priority=10))
    monkeypatch.setenv("KBIT_DISABLE_PLUGINS", "all")
    kbit.backends.reset()
    records = {r.name: r for r in kbit.backends.list()}
    assert records["goodplug2"].state == "disabled"
    assert records["reference"].state == "available"  # first-party backends are exempt from "all"
    assert kbit.backends.resolve("quantize_blockwise", "cpu", torch.float32, blocksize=64).name == "reference"
    monkeypatch.setenv("KBIT_DISABLE_PLUGINS", "goodplug2, cuda")
    kbit.backends.reset()
    records = {r.name: r for r in kbit.backends.list()}
    assert records["goodplug2"].state == records["cuda"].state == "disabled"
    with pytest.raises(kbit.BackendUnavailableError, match="disabled"):
        kbit.backends.get("goodplug2")


def test_disabled_plugin_is_not_even_imported(make_plugin, monkeypatch):
    make_plugin("import_error", "import_error", FAILURE_MODES["import_error"][2])
    monkeypatch.setenv("KBIT_DISABLE_PLUGINS", "import_error")
    kbit.backends.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kbit.KbitPluginWarning)
        assert {r.name: r.state for r in kbit.backends.list()}["import_error"] == "disabled"


def test_manifest_name_must_match_entry_point(make_plugin):
    make_plugin("misnamed", "misnamed", GOOD_PLUGIN.format(name="othername", dist="misnamed", priority=1))
    with pytest.warns(kbit.KbitPluginWarning):
        record = {r.name: r for r in kbit.backends.list()}["misnamed"]
    assert record.state == "invalid" and "othername" in record.reason


def _env_with_path(site):
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    for name in ("KBIT_BACKEND", "KBIT_DISABLE_PLUGINS", "KBIT_FALLBACK"):
        env.pop(name, None)
    return env
