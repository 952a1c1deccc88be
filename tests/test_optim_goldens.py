"""Five-step optimizer trajectories recorded with bitsandbytes (golden vectors ``optim``).

Acceptance (issue 5): Adam32bit parameters within 1e-5 of max |p|; 8-bit parameters within
1e-3 of max |p| and at least 99% of the state codes equal to the golden ones at every step.
The golden 8-bit codes come from the incumbent's CPU quantizer, which picks a code up to
3e-5 (normalised units) worse than the nearest one (FORMATS.md section 2); kbit picks the
nearest code and does not imitate that.
"""

import pytest
import torch

import kbit.functional as F
import kbit.optim as O
from kbit.testing.tolerances import OPTIMIZER_GOLDEN_CODE_EXCEPTIONS
from kbit.testing.tolerances import OPTIMIZER_TRAJECTORY as BAR

CLASSES = {"Adam8bit": O.Adam8bit, "Adam32bit": O.Adam32bit, "Lion8bit": O.Lion8bit, "SGD8bit": O.SGD8bit}



def _trajectory(entry, name):
    p = torch.nn.Parameter(entry["p0"].clone())
    optimizer = CLASSES[name]([p], **entry["kwargs"])
    for grad in entry["grads"]:
        p.grad = grad.clone()
        optimizer.step()
        yield p.detach().clone(), {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in optimizer.state[p].items()}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_optimizer_goldens(goldens, name):
    entry = goldens["optim"][name]
    eight_bit = name.endswith("8bit")
    for step, ((p, state), want_p, want) in enumerate(zip(_trajectory(entry, name), entry["params"], entry["states"], strict=True), 1):
        assert state["step"] == want["step"] == step
        assert set(want) <= set(state), f"missing state keys {set(want) - set(state)}"
        scale = float(want_p.abs().max())
        error = float((p - want_p).abs().max())
        assert error <= (BAR.param_rel_8bit if eight_bit else BAR.param_rel_32bit) * scale, f"step {step}: {error:.3g}"
        for key in want:
            if key.startswith("qmap"):
                assert torch.equal(state[key], want[key]), key
            elif key.startswith("absmax"):
                torch.testing.assert_close(state[key], want[key], rtol=BAR.absmax_rtol, atol=0)
            elif key.startswith("state") and eight_bit:
                agree = float((state[key] == want[key]).float().mean())
                floor = OPTIMIZER_GOLDEN_CODE_EXCEPTIONS.get((name, step, key))
                if floor is not None:  # explained where it is defined; judged code by code below
                    assert agree >= floor, f"exception {name} {step} {key}: {agree:.4f}"
                else:
                    assert agree >= BAR.min_equal_codes, f"step {step} {key}: {agree:.4f} of codes equal"
            elif key.startswith("state"):
                torch.testing.assert_close(state[key], want[key], rtol=1e-5, atol=1e-6 * float(want[key].abs().max()))


def test_adam8bit_step1_second_moment_differs_only_by_the_incumbents_slack(goldens):
    """At step 1 the state is exactly ``(1 - beta2) g^2`` on both sides (the absmax agree
    bit for bit), so every differing code can be judged: ours must be the nearest and the
    golden one at most 3e-5 (normalised) farther."""
    entry = goldens["optim"]["Adam8bit"]
    (_, state), want = next(iter(_trajectory(entry, "Adam8bit"))), entry["states"][0]
    assert torch.equal(state["absmax2"], want["absmax2"])
    code = F.create_dynamic_map(signed=False)
    g = entry["grads"][0].reshape(-1, 256)
    normalised = ((1 - 0.999) * g * g * (1 / want["absmax2"])[:, None]).reshape(-1)
    ours, theirs = state["state2"].reshape(-1).long(), want["state2"].reshape(-1).long()
    differs = ours != theirs
    distance_ours = (code[ours] - normalised).abs()
    distance_theirs = (code[theirs] - normalised).abs()
    nearest = (code[None, :] - normalised[differs][:, None]).abs().min(dim=1).values
    assert torch.equal(distance_ours[differs], nearest), "kbit's code must be the nearest"
    assert torch.all(distance_theirs[differs] - distance_ours[differs] <= 3e-5)
    assert float(differs.float().mean()) < 0.03
