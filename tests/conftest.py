"""Shared fixtures: goldens, a clean registry, throwaway plugin distributions."""

from __future__ import annotations

import textwrap
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

import pytest

import kbit
from kbit.testing._goldens import find_goldens, load_goldens, missing_goldens

# pytester runs the conformance suite on deliberately wrong backends in a nested session.
pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--device cuda`` runs the multi-process tests on GPUs with nccl (default: CPU, gloo)."""
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="device of the multi-process (torch.distributed) tests: cpu with gloo, or cuda with nccl "
        "(one GPU per rank; skipped when there are fewer GPUs than ranks)",
    )


@pytest.fixture(scope="session")
def goldens(request: pytest.FixtureRequest) -> dict:
    """The interoperability vectors of ../shared/spec/goldens (skips, saying why, when absent;
    fails instead under ``KBIT_REQUIRE_GOLDENS=1``, as in CI).

    Found the way the conformance suite finds them (``--kbit-goldens``, ``KBIT_GOLDENS``,
    then ``../shared/spec/goldens`` beside the checkout).
    """
    path, why_not = find_goldens(request.config.getoption("--kbit-goldens", None), REPO)
    if path is None:
        missing_goldens(why_not)
    return load_goldens(path)


#: Backends of other distributions installed in this environment (a developer may have
#: the NumPy plugin installed). The tests assume kbit's own backends only, and register
#: the plugins they exercise themselves, so installed ones are disabled for every test.
INSTALLED_PLUGINS = sorted(
    {entry.name for entry in entry_points(group="kbit.backends") if entry.dist is None or entry.dist.name != "kbit"}
)


@pytest.fixture(scope="session", autouse=True)
def installed_plugins_disabled():
    """Installed plugins stay disabled for module- and session-scoped fixtures too: they are
    set up before ``fresh_registry`` runs for a test, and a run split between a fixture
    and its test must not be served by two backends (kbit-cpu, installed by the README's
    commands, would otherwise serve the fixture's half)."""
    if not INSTALLED_PLUGINS:
        yield
        return
    patch = pytest.MonkeyPatch()
    patch.setenv("KBIT_DISABLE_PLUGINS", ",".join(INSTALLED_PLUGINS))
    kbit.backends.reset()
    yield
    patch.undo()
    kbit.backends.reset()


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch):
    """Every test starts from a clean registry, no KBIT_* variables and no installed plugins."""
    for name in ("KBIT_BACKEND", "KBIT_DISABLE_PLUGINS", "KBIT_FALLBACK"):
        monkeypatch.delenv(name, raising=False)
    if INSTALLED_PLUGINS:
        monkeypatch.setenv("KBIT_DISABLE_PLUGINS", ",".join(INSTALLED_PLUGINS))
    kbit.backends.reset()
    yield
    kbit.backends.reset()


@pytest.fixture
def make_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Create an installed-looking plugin distribution on ``sys.path``.

    ``make_plugin(dist, backend, module_source)`` writes package ``<dist>_pkg`` with
    ``manifest.py`` holding ``module_source`` and a ``<dist>-1.0.dist-info`` whose entry
    point ``<backend> = <dist>_pkg.manifest:MANIFEST`` is in the ``kbit.backends`` group.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(dist: str, backend: str, module_source: str) -> Path:
        package = site / f"{dist}_pkg"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "manifest.py").write_text(textwrap.dedent(module_source))
        info = site / f"{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[kbit.backends]\n{backend} = {dist}_pkg.manifest:MANIFEST\n")
        kbit.backends.reset()
        return site

    return make
