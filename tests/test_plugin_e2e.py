"""The plugin story end to end: real wheels, a fresh virtual environment, the kbit CLI.

kbit and plugins/kbit-numpy are built with ``pip wheel`` and installed with pip into a new
virtual environment, as a user would. There we check that ``kbit info`` lists the plugin,
that ``KBIT_BACKEND=numpy`` routes calls to it, that ``kbit conformance numpy`` passes, that
what it does not declare falls back or is refused per ``KBIT_FALLBACK``, and that a broken
plugin wheel leaves kbit working and shows up in ``kbit info`` with its error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from kbit.testing._goldens import find_goldens

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugins" / "kbit-numpy"

BROKEN_PYPROJECT = """
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "kbit-broken"
version = "0.3.0"
dependencies = ["kbit"]

[project.entry-points."kbit.backends"]
broken = "kbit_broken._manifest:MANIFEST"

[tool.setuptools]
packages = ["kbit_broken"]
"""

# The manifest module of the broken plugin fails to import.
BROKEN_MANIFEST = "import kbit_broken_missing_dependency  # noqa: F401\n"


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("KBIT_")}
    return {**env, **extra}


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env or _clean_env(), capture_output=True, text=True)


def _check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"
    return result


_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".venv")


def _build_wheel(tree: Path, wheels: Path) -> Path:
    # Always from a scratch copy of the sources: setuptools writes build/ and *.egg-info
    # next to them. No build isolation and no index: this environment's setuptools builds
    # the wheel and nothing is fetched.
    before = set(wheels.glob("*.whl"))
    _check(
        _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "-w", wheels, tree, cwd=tree)
    )  # fmt: skip
    (wheel,) = set(wheels.glob("*.whl")) - before
    return wheel


def _kbit_tree(scratch: Path) -> Path:
    tree = scratch / "kbit"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    for name in ("core", "backends"):
        shutil.copytree(REPO / name, tree / name, ignore=_IGNORE)
    return tree


def _share_third_party_packages(venv_python: Path, shared: Path) -> None:
    """Make this environment's third-party packages (torch, pydantic, numpy, pytest...)
    importable in the new venv, without kbit's own development install.

    Installing torch into the venv would copy ~1 GB from the local wheel cache (30 s or
    more); ``--system-site-packages`` would expose the system interpreter's packages, not
    this environment's. Instead ``shared`` gets a symlink to every entry of this
    environment's site-packages except kbit's (its editable install, dist-info and finder,
    so the venv sees only the kbit it installs from the wheel), and a ``.pth`` file in the
    venv's site-packages appends ``shared`` to ``sys.path``. kbit and the plugins are
    installed into the venv itself by pip.
    """
    shared.mkdir()
    source = Path(sysconfig.get_paths()["purelib"])
    for entry in source.iterdir():
        lowered = entry.name.lower()
        if lowered.startswith(("kbit", "__editable__", "_kbit")) or entry.suffix == ".pth":
            continue
        (shared / entry.name).symlink_to(entry)
    purelib = _check(
        _run(venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=shared.parent)
    ).stdout.strip()
    Path(purelib).mkdir(parents=True, exist_ok=True)
    (Path(purelib) / "_kbit_e2e_shared.pth").write_text(f"{shared}\n")


class Env:
    """A fresh venv with kbit and kbit-numpy installed from wheels."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "venv" / "bin"
        self.python = self.bin / "python"
        self.wheels = root / "wheels"

    def run(self, *command: str | Path, **env: str) -> subprocess.CompletedProcess:
        return _run(*command, cwd=self.root, env=_clean_env(**env))

    def kbit(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return self.run(self.bin / "kbit", *args, **env)

    def python_code(self, code: str, **env: str) -> subprocess.CompletedProcess:
        return self.run(self.python, "-c", textwrap.dedent(code), **env)

    def pip_install(self, *wheels: Path) -> None:
        _check(
            _run(sys.executable, "-m", "pip", "--python", self.python, "install", "-q", "--no-deps", "--no-index",
                 *wheels, cwd=self.root)
        )  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("e2e")
    environment = Env(root)
    environment.wheels.mkdir()
    build = root / "build"
    build.mkdir()
    kbit_wheel = _build_wheel(_kbit_tree(build), environment.wheels)
    numpy_wheel = _build_wheel(shutil.copytree(PLUGIN, build / PLUGIN.name, ignore=_IGNORE), environment.wheels)
    _check(_run(sys.executable, "-m", "venv", "--without-pip", root / "venv", cwd=root))
    _share_third_party_packages(environment.python, root / "shared")
    environment.pip_install(kbit_wheel, numpy_wheel)
    return environment


@pytest.fixture(scope="module")
def broken_wheel(env: Env) -> Path:
    source = env.root / "build" / "kbit-broken"
    (source / "kbit_broken").mkdir(parents=True)
    (source / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (source / "kbit_broken" / "__init__.py").write_text("")
    (source / "kbit_broken" / "_manifest.py").write_text(BROKEN_MANIFEST)
    return _build_wheel(source, env.wheels)


def test_installed_from_wheels_not_from_the_checkout(env):
    where = _check(
        env.python_code("""
            import kbit, kbit_numpy, kbit_reference
            print(kbit.__file__); print(kbit_numpy.__file__); print(kbit_reference.__file__)
        """)
    ).stdout.split()
    venv = str(env.root / "venv")
    assert all(path.startswith(venv) for path in where), where
    # Every declared requirement is satisfied in the venv (torch, pydantic, numpy, kbit).
    _check(_run(sys.executable, "-m", "pip", "--python", env.python, "check", cwd=env.root))


def test_kbit_info_lists_the_plugin(env):
    table = _check(env.kbit("info")).stdout
    line = next(line for line in table.splitlines() if line.startswith("numpy "))
    assert "kbit-numpy" in line and "0.1.0" in line and "available" in line and "blockwise8 7/8" in line
    assert "quant4 2/4" in line
    payload = json.loads(_check(env.kbit("info", "--json")).stdout)
    numpy = next(b for b in payload["backends"] if b["name"] == "numpy")
    assert numpy["state"] == "available" and numpy["device_types"] == ["cpu"] and numpy["priority"] == 10
    assert "estimate_quantiles" not in numpy["ops"] and "quantize_blockwise" in numpy["ops"]


def test_kbit_backend_routes_to_the_plugin(env):
    result = _check(
        env.python_code(
            """
            import torch, kbit, kbit.functional as F
            choice = kbit.backends.resolve("quantize_blockwise", "cpu", torch.float32, blocksize=64)
            print(choice.name, choice.fallback, type(choice.backend).__module__)
            A = torch.randn(1000, generator=torch.Generator().manual_seed(0))
            codes, state = F.quantize_blockwise(A, blocksize=64)
            ref_codes, ref_state = F.quantize_blockwise(A, blocksize=64, backend="reference")
            print(torch.equal(codes, ref_codes) and torch.equal(state.absmax, ref_state.absmax))
            """,
            KBIT_BACKEND="numpy",
        )
    )
    assert result.stdout.split() == ["numpy", "False", "kbit_numpy.backend", "True"]


def test_kbit_conformance_numpy_passes(env):
    goldens, _ = find_goldens()
    extra = ["--goldens", str(goldens)] if goldens is not None else []
    result = env.kbit("conformance", "numpy", "--report", str(env.root / "numpy.json"), *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = json.loads((env.root / "numpy.json").read_text())["runs"]
    assert run["backend"] == "numpy" and run["conformant"] and run["totals"]["failed"] == 0
    assert run["ops"]["quantize_blockwise"]["compared"] > 0 and run["ops"]["estimate_quantiles"]["refused"] == 3
    # 4-bit: quantize and dequantize implemented (no bfloat16 input or output), the products not.
    assert run["ops"]["quantize_4bit"]["compared"] > 0 and run["ops"]["quantize_4bit"]["refused"] == 64
    assert run["ops"]["gemv_4bit"]["refused"] == run["ops"]["matmul_4bit"]["refused"] == 192
    # With the golden vectors the four golden checks (8-bit and 4-bit quantize and
    # dequantize) run and pass; without, all four skip.
    golden_skips = [p for p in run["problems"] if p["kind"] == "goldens"]
    assert len(golden_skips) == (0 if goldens is not None else 4)
    assert "backend 'numpy' on cpu: CONFORMANT" in result.stdout


UNDECLARED = """
    import os, warnings, torch, kbit, kbit.functional as F

    # kbit reads KBIT_BACKEND and KBIT_FALLBACK at call time, so one process tries all three.
    for backend, fallback in (("", ""), ("numpy", ""), ("numpy", "error")):
        os.environ.update(KBIT_BACKEND=backend, KBIT_FALLBACK=fallback)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                q = F.estimate_quantiles(torch.randn(100))
                outcome = "served by " + kbit.backends.resolve("estimate_quantiles", "cpu", torch.float32).name
            except kbit.UnsupportedOpError as exc:
                outcome = "refused with " + type(exc).__name__
        print(f"{backend or '-'} {fallback or '-'}: {outcome} {sorted({type(w.message).__name__ for w in caught})}")
"""


def test_undeclared_op_falls_back_or_is_refused(env):
    lines = _check(env.python_code(UNDECLARED)).stdout.splitlines()
    assert lines == [
        # No preference: numpy does not declare it, the reference serves it (no fallback).
        "- -: served by reference []",
        # numpy preferred: the reference steps in, with a fallback warning...
        "numpy -: served by reference ['KbitFallbackWarning']",
        # ...unless KBIT_FALLBACK=error, which refuses the call.
        "numpy error: refused with NoBackendError []",
    ]


def test_the_plugin_template_test_file_runs(env):
    # The test file a vendor copies (plugins/kbit-numpy/tests) works as written.
    tests = env.root / "build" / "kbit-numpy" / "tests"
    result = env.run(env.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests, "-k", "test_manifest or float16-64")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend 'numpy' on cpu: CONFORMANT" in result.stdout


def test_broken_plugin_wheel_leaves_kbit_working(env, broken_wheel):
    env.pip_install(broken_wheel)
    info = env.kbit("info")
    assert info.returncode == 0
    line = next(line for line in info.stdout.splitlines() if line.startswith("broken "))
    assert "kbit-broken" in line and "invalid" in line and "ModuleNotFoundError" in line
    assert "kbit_broken_missing_dependency" in line
    works = _check(
        env.python_code("""
            import warnings, torch, kbit, kbit.functional as F
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                codes, state = F.quantize_blockwise(torch.randn(300), blocksize=64)
            print(F.dequantize_blockwise(codes, state).shape[0], kbit.backends.resolve(
                "quantize_blockwise", "cpu", torch.float32, blocksize=64).name)
            print([str(w.message) for w in caught if isinstance(w.message, kbit.KbitPluginWarning)])
        """)
    ).stdout.splitlines()
    assert works[0] == "300 numpy"
    assert "skipping backend 'broken' from kbit-broken" in works[1]
