"""``kbit check`` for the optimizer ops: passes for a faithful backend, fails for a wrong one."""

import dataclasses

import pytest

import kbit
from kbit._selftest import CHECKS, REFERENCE_CHECKS, run_checks
from kbit_reference._manifest import MANIFEST as REFERENCE_MANIFEST
from kbit_reference.backend import ReferenceBackend

OPTIMIZER_OPS = ["optimizer_update_32bit", "optimizer_update_8bit", "optimizer_update_8bit_blockwise", "percentile_clipping"]


class FaithfulCopy(ReferenceBackend):
    """The reference under another name: every check must pass."""


class StaleAdam(ReferenceBackend):
    """Adam without bias correction of the second moment (a classic kernel bug)."""

    def optimizer_update_32bit(self, step, g, p, state1, state2, unorm_vec):
        if step.kind.name == "adam" and step.step == 1:
            step = dataclasses.replace(step, beta2=0.0)
        super().optimizer_update_32bit(step, g, p, state1, state2, unorm_vec)

    def optimizer_update_8bit_blockwise(self, step, g, p, state1, state2, **kw):
        step = dataclasses.replace(step, lr=step.lr * 1.01)  # a slightly wrong step size
        super().optimizer_update_8bit_blockwise(step, g, p, state1, state2, **kw)


def _backend(cls, name):
    # kbit check routes through the registry with the backend pinned: register it first.
    kbit.backends.register(REFERENCE_MANIFEST.model_copy(update={"name": name, "factory": f"{__name__}:{cls.__name__}"}))
    return kbit.backends.get(name)


def test_every_optimizer_op_has_a_check():
    assert set(OPTIMIZER_OPS) <= set(CHECKS)
    assert "optimizer_update_32bit" in REFERENCE_CHECKS


def test_faithful_backend_passes_and_the_reference_matches_torch_adam():
    reference = kbit.backends.get("reference")
    results = {r.op: r for r in run_checks(_backend(FaithfulCopy, "copy"), reference)}
    for op in OPTIMIZER_OPS:
        assert results[op].status == "passed", results[op]
    own = {r.op: r for r in run_checks(reference, reference)}
    assert own["optimizer_update_32bit"].status == "passed"


@pytest.mark.parametrize("op, fragment", [("optimizer_update_32bit", "adam"), ("optimizer_update_8bit_blockwise", "parameter movement")])
def test_wrong_backend_fails_with_a_reason(op, fragment):
    reference = kbit.backends.get("reference")
    results = {r.op: r for r in run_checks(_backend(StaleAdam, "stale"), reference)}
    assert results[op].status == "failed" and fragment in results[op].detail, results[op]
    assert results["optimizer_update_8bit"].status == "passed"
