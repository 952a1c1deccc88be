"""The eager fast path: public calls skip torch's dispatcher only when it has nothing to do.

``kbit._ops.call_with_backend`` calls an op's kernel function directly in plain eager
mode (docs/dispatch.md). These tests pin down both sides: the direct route is taken for
ordinary calls and gives the dispatcher's results, and every situation where the
dispatcher does matter (compilation, autograd, fake and meta tensors, subclasses, modes,
autocast, mutating ops) still goes through it and still works.
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
    direct = kops.direct_kernel(op)(*inputs)
    dispatched = op(*inputs)
    for a, b in zip(direct if isinstance(direct, tuple) else (direct,), dispatched if isinstance(dispatched, tuple) else (dispatched,)):
        assert torch.equal(a, b)


def test_ops_that_mutate_an_argument_always_take_the_dispatcher():
    # It bumps the mutated tensors' version counters, which autograd relies on.
    assert kops.direct_kernel(optim.optimizer_update_32bit) is None
    assert kops.direct_kernel(optim.optimizer_update_8bit_blockwise) is None
    assert kops.direct_kernel(blockwise8.histogram_scatter_add_2d) is None
    assert kops.direct_kernel(blockwise8.quantize_blockwise) is not None


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
