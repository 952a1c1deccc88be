"""Installing kbit's bitsandbytes package where a real bitsandbytes is (and the reverse).

Both are wheels named ``bitsandbytes``, so pip uninstalls one before installing the other
and says so: the two never share the ``bitsandbytes/`` folder. A stand-in for the real
project (a wheel named bitsandbytes 0.50.2) is built here; nothing is downloaded.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_plugin_e2e import _IGNORE, REPO, _build_wheel, _check, _run

pytestmark = pytest.mark.slow

COMPAT = REPO / "plugins" / "bitsandbytes-compat"

STAND_IN_PYPROJECT = """
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "bitsandbytes"
version = "0.50.2"

[tool.setuptools]
packages = ["bitsandbytes"]
"""


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    scratch = tmp_path_factory.mktemp("bnb-wheels")
    compat_tree = scratch / "compat"
    shutil.copytree(COMPAT, compat_tree, ignore=_IGNORE)
    stand_in = scratch / "stand-in"
    (stand_in / "bitsandbytes").mkdir(parents=True)
    (stand_in / "pyproject.toml").write_text(textwrap.dedent(STAND_IN_PYPROJECT))
    (stand_in / "bitsandbytes" / "__init__.py").write_text('__version__ = "0.50.2"\n')
    (stand_in / "bitsandbytes" / "libbitsandbytes_cpu.py").write_text("# a file only the real project has\n")
    compat_dir, real_dir = scratch / "compat-wheel", scratch / "real-wheel"  # an index holds only the real one
    compat_dir.mkdir()
    real_dir.mkdir()
    return {"compat": _build_wheel(compat_tree, compat_dir), "real": _build_wheel(stand_in, real_dir), "index": real_dir}


def _pip(venv_python: Path, *args: str | Path):
    return _check(_run(sys.executable, "-m", "pip", "--python", venv_python, *args, cwd=venv_python.parent))


def _installed(venv_python: Path) -> tuple[str, list[str]]:
    code = (
        "import importlib.metadata as m, pathlib, sysconfig\n"
        "folder = pathlib.Path(sysconfig.get_paths()['purelib']) / 'bitsandbytes'\n"
        "print(m.version('bitsandbytes'))\n"
        "print(' '.join(sorted(p.name for p in folder.glob('*.py'))))\n"
    )
    version, files = _check(_run(venv_python, "-c", code, cwd=venv_python.parent)).stdout.splitlines()
    return version, files.split()


def test_pip_replaces_one_bitsandbytes_with_the_other_and_says_so(wheels, tmp_path):
    _check(_run(sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv", cwd=tmp_path))
    python = tmp_path / "venv" / "bin" / "python"
    install = ("install", "--no-deps", "--no-index")
    _pip(python, *install, wheels["real"])
    assert _installed(python) == ("0.50.2", ["__init__.py", "libbitsandbytes_cpu.py"])

    output = _pip(python, *install, wheels["compat"]).stdout
    assert "Successfully uninstalled bitsandbytes-0.50.2" in output, output
    version, files = _installed(python)
    assert version == "0.50.2+kbit" and "_guard.py" in files and "libbitsandbytes_cpu.py" not in files

    # Requirements on bitsandbytes, even ==0.50.2 (PEP 440 ignores the local label), are
    # satisfied by kbit's package: it stays...
    for requirement in ("bitsandbytes", "bitsandbytes==0.50.2", "bitsandbytes>=0.46.1"):
        output = _pip(python, *install, "--find-links", wheels["index"], requirement).stdout
        assert "Requirement already satisfied" in output and _installed(python)[0] == "0.50.2+kbit", output
    # ...until the real one is asked for explicitly, which swaps back and says so.
    output = _pip(python, *install, "--force-reinstall", "--find-links", wheels["index"], "bitsandbytes==0.50.2").stdout
    assert "Successfully uninstalled bitsandbytes-0.50.2+kbit" in output, output
    assert _installed(python) == ("0.50.2", ["__init__.py", "libbitsandbytes_cpu.py"])
