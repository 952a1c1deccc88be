"""The eager fast path: public calls skip torch's dispatcher only when it has nothing to do.

``kbit._ops.call_with_backend`` calls an op's kernel function directly in plain eager
mode (docs/dispatch.md). These tests pin down both sides: the direct route is taken for
ordinary calls and gives the dispatcher's results, and every situation where the
dispatcher does matter (compilation, autograd, fake and meta tensors, subclasses, modes,
autocast) still goes through it and still works; ops that write into their arguments bump
the same version counters either way.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kbit
import kbit._ops as kops
import kbit.functional as F
from kbit._ops import blockwise8, optim, quant4
from kbit.functional._codebooks import cached_code


@pytest.fixture
def routes(monkeypatch):
    """Records, per call through call_with_backend, whether the dispatcher was needed."""
    seen: list[bool] = []
    original = kops.dispatcher_needed

    def recording(args):
        needed = original(args)
        seen.append(needed)
        return needed

    monkeypatch.setattr(kops, "dispatcher_needed", recording)
    return seen


def test_a_plain_eager_call_takes_the_direct_route(routes):
    codes, state = F.quantize_blockwise(torch.randn(4096))
    F.dequantize_blockwise(codes, state)
    assert routes == [False, False]


@pytest.mark.parametrize("op,args", [
    (blockwise8.quantize_blockwise, lambda: (torch.randn(3000), cached_code("dynamic"), 256)),
    (blockwise8.dequantize_blockwise,
     lambda: (torch.randint(0, 256, (3000,), dtype=torch.uint8), torch.rand(12), cached_code("dynamic"), 256,
              torch.bfloat16)),
    (quant4.quantize_4bit, lambda: (torch.randn(1000), 64, "nf4", torch.uint8)),
], ids=["quantize_blockwise", "dequantize_blockwise", "quantize_4bit"])  # fmt: skip
def test_both_routes_give_the_same_result(op, args):
    inputs = args()
    direct = kops.direct_kernel(op)[0](*inputs)
    dispatched = op(*inputs)
    for a, b in zip(direct if isinstance(direct, tuple) else (direct,), dispatched if isinstance(dispatched, tuple) else (dispatched,)):
        assert torch.equal(a, b)


def test_ops_that_mutate_an_argument_know_which_arguments_they_write():
    kernel, written = kops.direct_kernel(optim.optimizer_update_8bit_blockwise)
    names = [optim.optimizer_update_8bit_blockwise._opoverload._schema.arguments[i].name for i in written]
    assert {"p", "state1", "absmax1"} <= set(names) and "g" not in names
    assert kops.direct_kernel(blockwise8.quantize_blockwise)[1] == ()


def _adam_8bit_step(step: int = 1) -> dict[str, torch.Tensor]:
    """Tensors for one blockwise 8-bit Adam update (named as the functional API names them)."""
    gen = torch.Generator().manual_seed(step)
    n = 1000
    signed, unsigned = F.create_dynamic_map(), F.create_dynamic_map(signed=False)
    m, m_state = F.quantize_blockwise(torch.randn(n, generator=gen) * 1e-2, code=signed, blocksize=256)
    v, v_state = F.quantize_blockwise(torch.rand(n, generator=gen) * 1e-4, code=unsigned, blocksize=256)
    return dict(g=torch.randn(n, generator=gen), p=torch.randn(n, generator=gen), state1=m, state2=v,
                qmap1=signed, qmap2=unsigned, absmax1=m_state.absmax, absmax2=v_state.absmax)  # fmt: skip


def _run_adam_8bit(tensors: dict[str, torch.Tensor]) -> None:
    F.optimizer_update_8bit_blockwise("adam", tensors["g"], tensors["p"], tensors["state1"], tensors["state2"],
                                      beta1=0.9, beta2=0.999, beta3=0.0, alpha=0.0, eps=1e-8, step=3, lr=1e-3,
                                      qmap1=tensors["qmap1"],
                                      qmap2=tensors["qmap2"], absmax1=tensors["absmax1"], absmax2=tensors["absmax2"],
                                      weight_decay=0.0, gnorm_scale=1.0)  # fmt: skip


def test_a_mutating_op_takes_the_direct_route_and_bumps_what_the_dispatcher_bumps(routes, monkeypatch):
    # The dispatcher's only work for an eager in-place custom op is bumping the version
    # counters of the written arguments; the direct route must do the same, and write the same.
    direct = _adam_8bit_step()
    before = {name: t._version for name, t in direct.items()}
    routes.clear()
    _run_adam_8bit(direct)
    assert routes == [False]
    bumped_direct = {name for name, t in direct.items() if t._version != before[name]}

    monkeypatch.setattr(kops, "dispatcher_needed", lambda args: True)
    dispatched = _adam_8bit_step()
    before = {name: t._version for name, t in dispatched.items()}
    _run_adam_8bit(dispatched)
    bumped_dispatched = {name for name, t in dispatched.items() if t._version != before[name]}

    assert bumped_direct == bumped_dispatched and {"p", "state1", "state2", "absmax1", "absmax2"} <= bumped_direct
    assert all(torch.equal(direct[name], dispatched[name]) for name in direct)


def test_autograd_sees_an_optimizer_step_on_a_tensor_saved_for_backward():
    # A parameter saved for backward and then updated in place by an 8-bit step (direct
    # route: no grad mode, plain tensors) must make that backward fail, as torch's own
    # in-place ops do, instead of silently using the new values.
    tensors = _adam_8bit_step()
    weight = tensors["p"].requires_grad_(True)
    x = torch.randn(1000, requires_grad=True)
    loss = (x * weight).sum()  # saves weight for x's gradient
    with torch.no_grad():
        _run_adam_8bit(tensors)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _weight():
    packed, state = F.quantize_4bit(torch.randn(32, 64), blocksize=64)
    return packed, state


def test_a_gradient_to_record_takes_the_dispatcher_and_flows(routes):
    packed, state = _weight()
    A = torch.randn(3, 64, requires_grad=True)
    kbit.matmul_4bit(A, packed.t(), quant_state=state).sum().backward()
    assert routes[-1] is True and A.grad is not None and A.grad.abs().sum() > 0
    with torch.no_grad():
        kbit.matmul_4bit(A, packed.t(), quant_state=state)
    assert routes[-1] is False


def test_compiled_calls_keep_one_opaque_op_and_match_eager(routes):
    def quantize(x):
        codes, state = F.quantize_blockwise(x, blocksize=256)
        return codes, state.absmax

    x = torch.randn(2, 1000)
    compiled = torch.compile(quantize, fullgraph=True, backend="aot_eager")
    eager = quantize(x)
    got = compiled(x)
    assert all(torch.equal(a, b) for a, b in zip(got, eager))
    assert routes[0] is False  # the eager call
    assert routes[1:] and all(routes[1:])  # traced: the op stays an op in the graph


def test_fake_and_meta_tensors_go_through_the_fake_kernels():
    with FakeTensorMode(allow_non_fake_inputs=True):  # the default code table is a real tensor
        codes, state = F.quantize_blockwise(torch.randn(2, 1000), blocksize=256)
        assert codes.shape == (2, 1000) and state.absmax.shape == (8,)
    assert kops.dispatcher_needed((torch.empty(10, device="meta"),))


def test_subclasses_modes_and_autocast_take_the_dispatcher():
    class Tagged(torch.Tensor):
        pass

    plain = torch.randn(4)
    assert not kops.dispatcher_needed((plain, 3, "nf4"))
    assert kops.dispatcher_needed((plain.as_subclass(Tagged),))
    assert not kops.dispatcher_needed((torch.nn.Parameter(plain, requires_grad=False),))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kops.dispatcher_needed((plain,))
    with torch.overrides.TorchFunctionMode():
        assert kops.dispatcher_needed((plain,))
    assert not kops.dispatcher_needed((plain,))
