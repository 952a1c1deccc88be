"""``kbit conformance``: the packaged suite against an installed backend, by name."""

import json
import os
import subprocess
import sys

from kbit._formats import BLOCKSIZES_8BIT_ALL
from kbit.cli import build_parser
from kbit.testing._goldens import find_goldens

# The subprocess finds the golden vectors as this process does; without them, golden
# checks skip (and do not block the verdict).
GOLDEN_CHECKS_RUN = int(find_goldens()[0] is not None)

OFF_BY_ONE_PLUGIN = """
    import torch
    from kbit.backend import API_VERSION, BackendManifest, OpSupport
    from kbit_reference.backend import ReferenceBackend

    class OffByOne(ReferenceBackend):
        def quantize_blockwise(self, A, *, code, blocksize, **rand):
            codes, absmax = super().quantize_blockwise(A, code=code, blocksize=blocksize, **rand)
            return (codes.int() + 1).clamp(max=255).to(torch.uint8), absmax

    MANIFEST = BackendManifest(
        name="offbyone", api_version=API_VERSION, priority=5, device_types=("cpu",),
        factory="offbyone_pkg.manifest:OffByOne",
        ops={"quantize_blockwise": OpSupport(dtypes=("float32",), blocksizes=(64, 128)),
             "dequantize_blockwise": OpSupport(dtypes=("float32",), blocksizes=(64, 128))},
    )
"""


def conformance(tmp_path, *args, site=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_") or k == "KBIT_GOLDENS"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "kbit", "conformance", *args, "--report", str(report)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    return result, json.loads(report.read_text())


def test_parser_knows_the_command():
    args = build_parser().parse_args(["conformance", "acme", "--device", "cuda", "-k", "4bit", "--report", "r.json"])
    assert (args.name, args.device, args.keyword, args.report) == ("acme", "cuda", "4bit", "r.json")


def test_reference_passes_and_exits_zero(tmp_path):
    # opcheck is left out: its first call costs seconds, and it runs in-process elsewhere.
    selection = (
        "(test_manifest or blockwise-float32-64 or test_goldens or int8_linear_matmul"
        " or optimizer_update_8bit_blockwise-float32-adam) and not test_opcheck"
    )
    result, payload = conformance(tmp_path, "reference", "-k", selection)
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = payload["runs"]
    assert run["backend"] == "reference" and run["device"] == "cpu" and run["conformant"]
    # compare (nearest and stochastic rounding), the statistics of stochastic rounding, goldens
    assert run["ops"]["quantize_blockwise"]["compared"] == 3 + GOLDEN_CHECKS_RUN
    assert run["ops"]["int8_linear_matmul"]["compared"] == 1
    assert run["ops"]["optimizer_update_8bit_blockwise"]["compared"] == 1 + GOLDEN_CHECKS_RUN
    assert "COMPARED" in result.stdout
    assert "backend 'reference' on cpu: CONFORMANT" in result.stdout


def test_wrong_plugin_fails_and_exits_one(tmp_path, make_plugin):
    site = make_plugin("offbyone", "offbyone", OFF_BY_ONE_PLUGIN)
    result, payload = conformance(tmp_path, "offbyone", "-k", "not test_opcheck", site=site)
    assert result.returncode == 1
    (run,) = payload["runs"]
    # Both declared variants and the goldens fail; dequantize is fine.
    assert run["ops"]["quantize_blockwise"]["failed"] == 2 + GOLDEN_CHECKS_RUN
    assert run["ops"]["dequantize_blockwise"]["failed"] == 0
    # Everything it does not declare was refused: every other (dtype, blocksize) with nearest
    # rounding, and every variant with stochastic rounding.
    variants = 3 * len(BLOCKSIZES_8BIT_ALL)
    assert run["ops"]["quantize_blockwise"]["refused"] == (variants - 2) + variants
    assert "NOT CONFORMANT" in result.stdout


def test_unavailable_backend_exits_one_with_the_reason(tmp_path):
    result, payload = conformance(tmp_path, "cuda")
    assert result.returncode == 1
    (run,) = payload["runs"]
    assert run["device"] == "cuda" and run["totals"]["failed"] == 0 and run["totals"]["skipped"] > 0
    assert "backend 'cuda' is unavailable here" in result.stdout


def test_a_selection_matching_nothing_exits_one_and_says_so(tmp_path):
    result, payload = conformance(tmp_path, "reference", "-k", "no_test_is_called_this")
    assert result.returncode == 1
    assert "-k 'no_test_is_called_this' selects no test of backend 'reference'" in result.stderr
    assert payload["runs"] == [] or not any(run["totals"]["compared"] for run in payload["runs"])
