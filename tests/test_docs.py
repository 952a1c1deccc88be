"""Documentation that runs: every Python block in README.md and docs/*.md executes.

A block whose first line is ``# requires: gpu`` is skipped on machines without CUDA; one
whose first line is ``# requires: integration`` needs transformers, peft, accelerate and
kbit's bitsandbytes package (skipped without them, a failure under CI).
"""

import re
from pathlib import Path

import pytest
import torch

from tests._ecosystem import require, require_compat

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _python_blocks():
    for path in DOCS:
        for number, match in enumerate(BLOCK.finditer(path.read_text()), start=1):
            yield pytest.param(match.group(1), id=f"{path.relative_to(REPO)}#{number}")


@pytest.mark.parametrize("source", list(_python_blocks()))
def test_python_block_runs(source, tmp_path, monkeypatch):
    if source.startswith("# requires: gpu") and not torch.cuda.is_available():
        pytest.skip("example needs a CUDA device")
    if source.startswith("# requires: integration"):
        for name in ("transformers", "peft", "accelerate"):
            require(name)
        require_compat()
    monkeypatch.chdir(tmp_path)
    exec(compile(source, "<doc block>", "exec"), {"__name__": "__doc_example__"})


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^```bash\n(.*?)\n```", readme, re.S | re.M)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_readme_main_command_installs_and_runs_the_demo():
    readme = (REPO / "README.md").read_text()
    first = re.search(r"^```bash\n(.*?)\n```", readme, re.S | re.M).group(1)
    assert "pip install" in first and first.rstrip().endswith("kbit demo"), first
