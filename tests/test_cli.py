"""The kbit command line."""

import json
import re
import subprocess
import sys
from pathlib import Path

from kbit.cli import main


def test_info_lists_reference_and_cuda(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert "available" in lines["reference"] and "blockwise8 8/8" in lines["reference"]
    assert "unavailable" in lines["cuda"]
    assert "cupy is not installed" in lines["cuda"] or "no CUDA device" in lines["cuda"]


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    states = {b["name"]: b["state"] for b in payload["backends"]}
    assert states["reference"] == "available" and states["cuda"] == "unavailable"


def test_check_passes(capsys):
    assert main(["check"]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_check_fails_for_a_disagreeing_backend(capsys):
    import kbit
    from kbit.backend import API_VERSION, BackendManifest, OpSupport

    kbit.backends.register(
        BackendManifest(
            name="offbyone",
            api_version=API_VERSION,
            device_types=("cpu",),
            factory="tests.test_cli:OffByOne",
            ops={"quantize_blockwise": OpSupport()},
        )
    )
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "offbyone" in out and "failed" in out
    # The summary counts numerical comparisons apart from checks: the off-by-one backend's
    # quantize_blockwise check compared input sets before it found the first mismatch.
    assert re.search(r"\d+ checks passed, 1 failed; \d+ results compared numerically", out)


def test_python_dash_m_and_console_script():
    result = subprocess.run([sys.executable, "-m", "kbit", "info"], capture_output=True, text=True)
    assert result.returncode == 0 and "reference" in result.stdout
    assert subprocess.run([sys.executable, "-m", "kbit"], capture_output=True).returncode == 2
    # The console script installed beside this interpreter (pip install puts it there).
    script = Path(sys.executable).parent / "kbit"
    result = subprocess.run([str(script), "check"], capture_output=True, text=True)
    assert result.returncode == 0 and "0 failed" in result.stdout
    assert subprocess.run([str(script), "no-such-command"], capture_output=True).returncode == 2


from kbit_reference.backend import ReferenceBackend  # noqa: E402


class OffByOne(ReferenceBackend):
    """A deliberately wrong backend: every code one step too high."""

    def quantize_blockwise(self, A, *, code, blocksize, **rand):
        codes, absmax = super().quantize_blockwise(A, code=code, blocksize=blocksize, **rand)
        return (codes.int() + 1).clamp(max=255).to(codes.dtype), absmax
