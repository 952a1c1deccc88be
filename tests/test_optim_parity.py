"""32-bit kbit optimizers against torch.optim and against plain reference implementations."""

import math

import pytest
import torch

import kbit.optim as O

STEPS = 20
SHAPES = [(64, 80), (50,)]  # one tensor above min_8bit_size, one below


def _params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for shape in SHAPES]


def _gradients(seed=1, steps=STEPS, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen) * scale for shape in SHAPES] for _ in range(steps)]


def _run(make_optimizer, initial, gradients):
    params = [torch.nn.Parameter(p.clone()) for p in initial]
    optimizer = make_optimizer(params)
    trajectory = []
    for grads in gradients:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory, optimizer, params


TORCH_PAIRS = {
    "Adam": (lambda ps: O.Adam(ps, lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    "Adam32bit-betas": (
        lambda ps: O.Adam32bit(ps, lr=3e-3, betas=(0.8, 0.99), eps=1e-6),
        lambda ps: torch.optim.Adam(ps, lr=3e-3, betas=(0.8, 0.99), eps=1e-6),
    ),
    "AdamW": (
        lambda ps: O.AdamW(ps, lr=1e-2, weight_decay=0.05),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
    ),
    "SGD": (
        lambda ps: O.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=1e-3),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=1e-3),
    ),
    "RMSprop": (
        lambda ps: O.RMSprop(ps, lr=1e-3, alpha=0.95, weight_decay=1e-3),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.95, weight_decay=1e-3),
    ),
    "Adagrad": (
        lambda ps: O.Adagrad(ps, lr=1e-2, weight_decay=1e-3),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2, weight_decay=1e-3),
    ),
}


@pytest.mark.parametrize("name", sorted(TORCH_PAIRS))
def test_32bit_matches_torch_optim_over_20_steps(name):
    make_kbit, make_torch = TORCH_PAIRS[name]
    initial, gradients = _params(), _gradients()
    ours, optimizer, _ = _run(make_kbit, initial, gradients)
    theirs, _, _ = _run(make_torch, initial, gradients)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=lambda m, s=step: f"step {s + 1}: {m}")
    for state in optimizer.state.values():
        assert state["state1"].dtype == torch.float32 and state["step"] == STEPS


# ------------------------------------------------------------ straightforward references
class _Reference:
    """A per-tensor loop over the textbook rule, float64, for the kinds torch.optim lacks."""

    def __init__(self, rule, **hyper):
        self.rule, self.hyper, self.state, self.t = rule, hyper, {}, 0

    def run(self, initial, gradients):
        params = [p.double().clone() for p in initial]
        trajectory = []
        for grads in gradients:
            self.t += 1
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                params[i] = self.rule(self, i, p, g.double())
            trajectory.append([p.float() for p in params])
        return trajectory


def _trust(update, p, max_unorm):
    unorm, pnorm = update.norm(), p.norm()
    return max_unorm * pnorm / unorm if unorm > max_unorm * pnorm else 1.0


def _lion(ref, i, p, g):
    h = ref.hyper
    m = ref.state.get(i, torch.zeros_like(p))
    p = p * (1 - h["lr"] * h["wd"]) - h["lr"] * torch.sign(h["b1"] * m + (1 - h["b1"]) * g)
    ref.state[i] = h["b2"] * m + (1 - h["b2"]) * g
    return p


def _lamb(ref, i, p, g):
    h, t = ref.hyper, ref.t
    m, v = ref.state.get(i, (torch.zeros_like(p), torch.zeros_like(p)))
    m = h["b1"] * m + (1 - h["b1"]) * g
    v = h["b2"] * v + (1 - h["b2"]) * g * g
    ref.state[i] = (m, v)
    m_hat, v_hat = m / (1 - h["b1"] ** t), v / (1 - h["b2"] ** t)
    update = m_hat / (v_hat.sqrt() + h["eps"])
    scale = _trust(update, p, h["max_unorm"])
    return p * (1 - h["lr"] * h["wd"]) - h["lr"] * scale * update


def _lars(ref, i, p, g):
    h = ref.hyper
    g = g + h["wd"] * p
    m = g if i not in ref.state else h["momentum"] * ref.state[i] + g
    ref.state[i] = m
    return p - h["lr"] * _trust(m, p, h["max_unorm"]) * m


def _ademamix(ref, i, p, g):
    h, t = ref.hyper, ref.t
    m1, m2, nu = ref.state.get(i, (torch.zeros_like(p),) * 3)
    b1, b2, b3, alpha = h["b1"], h["b2"], h["b3"], h["alpha"]
    if h["t_alpha"]:
        alpha = min(t * alpha / h["t_alpha"], alpha)
    if h["t_beta3"]:
        # log-linear interpolation of the half-life from beta1 to beta3 over t_beta3 steps
        frac = t / h["t_beta3"]
        b3 = min(math.exp(math.log(b1) * math.log(b3) / ((1 - frac) * math.log(b3) + frac * math.log(b1))), b3)
    m1 = b1 * m1 + (1 - b1) * g
    m2 = b3 * m2 + (1 - b3) * g
    nu = b2 * nu + (1 - b2) * g * g
    ref.state[i] = (m1, m2, nu)
    c1, c2 = 1 - b1**t, math.sqrt(1 - b2**t)
    p = p * (1 - h["lr"] * h["wd"])
    return p - h["lr"] * (m1 / c1 + alpha * m2) / (nu.sqrt() / c2 + h["eps"])


REFERENCE_CASES = {
    "Lion": (
        lambda ps: O.Lion(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        lambda: _Reference(_lion, lr=1e-3, b1=0.9, b2=0.99, wd=0.1),
    ),
    "LAMB": (
        lambda ps: O.LAMB(ps, lr=1e-2, weight_decay=0.01, max_unorm=0.05),
        lambda: _Reference(_lamb, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.01, max_unorm=0.05),
    ),
    "LARS": (
        lambda ps: O.LARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, max_unorm=0.02),
        lambda: _Reference(_lars, lr=0.1, momentum=0.9, wd=1e-3, max_unorm=0.02),
    ),
    "PytorchLARS": (
        lambda ps: O.PytorchLARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, max_unorm=0.02),
        lambda: _Reference(_lars, lr=0.1, momentum=0.9, wd=1e-3, max_unorm=0.02),
    ),
    "AdEMAMix": (
        lambda ps: O.AdEMAMix(ps, lr=1e-2, alpha=5.0, weight_decay=0.01),
        lambda: _Reference(_ademamix, lr=1e-2, b1=0.9, b2=0.999, b3=0.9999, alpha=5.0, eps=1e-8, wd=0.01,
                           t_alpha=None, t_beta3=None),
    ),
    "AdEMAMix-schedules": (
        lambda ps: O.AdEMAMix32bit(ps, lr=1e-2, betas=(0.9, 0.999, 0.999), alpha=8.0, t_alpha=10, t_beta3=15),
        lambda: _Reference(_ademamix, lr=1e-2, b1=0.9, b2=0.999, b3=0.999, alpha=8.0, eps=1e-8, wd=0.01,
                           t_alpha=10, t_beta3=15),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFERENCE_CASES))
def test_32bit_matches_a_straightforward_reference(name):
    make_kbit, make_reference = REFERENCE_CASES[name]
    initial, gradients = _params(), _gradients()
    ours, _, _ = _run(make_kbit, initial, gradients)
    theirs = make_reference().run(initial, gradients)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=lambda m, s=step: f"step {s + 1}: {m}")


@pytest.mark.parametrize("name, max_unorm", [("LARS", 0.02), ("LAMB", 0.05)])
def test_trust_ratio_actually_clips_in_the_lamb_and_lars_cases(name, max_unorm):
    """Guard against a vacuous comparison: the chosen max_unorm must bind."""
    initial, gradients = _params(), _gradients()
    _, optimizer, params = _run(REFERENCE_CASES[name][0], initial, gradients[:1])
    update_norm = optimizer.state[params[0]]["unorm_vec"].sqrt()
    assert update_norm > max_unorm * initial[0].norm()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_parameters_follow_the_float32_trajectory(dtype):
    initial, gradients = _params(dtype=dtype), _gradients(steps=5)
    ours, optimizer, _ = _run(lambda ps: O.Adam(ps, lr=1e-2), initial, [[g.to(dtype) for g in gs] for gs in gradients])
    theirs, _, _ = _run(lambda ps: O.Adam(ps, lr=1e-2), [p.float() for p in initial], gradients)
    assert all(p.dtype == dtype for p in ours[-1])
    assert all(s["state1"].dtype == torch.float32 for s in optimizer.state.values())
    resolution = torch.finfo(dtype).eps
    for x, y in zip(ours[-1], theirs[-1], strict=True):
        torch.testing.assert_close(x.float(), y, atol=5 * resolution, rtol=5 * resolution)
