"""torch custom ops in the ``kbit`` namespace, one module per op family.

Each op is defined with ``torch.library.custom_op`` and a fake (meta) implementation, so
``torch.compile`` sees one opaque node with known output shapes. The op's single kernel
asks the registry which backend serves the call and forwards to it: torch.library is the
compile boundary, the registry is the selector (torch allows one kernel per dispatch key;
the registry can rank several backends for one device).

Eager fast path: going through torch's dispatcher costs about 20 us per call, more than a
native backend needs to quantize a few thousand values. When nothing the dispatcher adds
can apply to a call (see :func:`dispatcher_needed`: no compilation or tracing, no
dispatch or function modes, no autocast or functorch transform, plain tensors, no
autograd to record, no tensor it would version-bump), :func:`call_with_backend` calls the
op's kernel function directly. It is the same function the dispatcher would run, backend
resolution and result checks included, so the results are identical; under
``torch.compile`` the op stays one opaque node.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch._library.custom_ops import CustomOpDef

from ..backend import Backend
from ..backends._registry import REGISTRY, note_call


def backend_for(op: str, like: torch.Tensor, dtype: torch.dtype | None = None, **params: object) -> Backend:
    """The backend serving ``op`` for tensors like ``like`` (its device; ``dtype`` or its dtype)."""
    resolution = REGISTRY.resolve(op, like.device.type, dtype or like.dtype, warn=True, **params)
    note_call(op, resolution.device_type, resolution.name)
    return resolution.backend


#: Tensor types the direct call takes (subclasses may override dispatch; they go through it).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_direct_kernels: dict[Any, Optional[Callable[..., Any]]] = {}


def direct_kernel(op: Any) -> Optional[Callable[..., Any]]:
    """The kernel function of custom op ``op`` if it may be called without the dispatcher:
    ops that mutate an argument are excluded (the dispatcher bumps the mutated tensors'
    version counters, which autograd relies on)."""
    try:
        return _direct_kernels[op]
    except KeyError:
        pass
    kernel = None
    if isinstance(op, CustomOpDef) and not op._opoverload._schema.is_mutable:
        # A private attribute of torch.library: a torch without it keeps the dispatcher path.
        kernel = getattr(op, "_init_fn", None)
    _direct_kernels[op] = kernel
    return kernel


def dispatcher_needed(args: tuple) -> bool:
    """Whether calling an op with ``args`` needs torch's dispatcher (True) or may call the
    op's kernel directly with the same result (False)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    if (
        torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or torch._C._is_any_autocast_enabled()
    ):
        return True
    grad = torch.is_grad_enabled()
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if type(arg) not in _PLAIN_TENSORS or arg.device.type == "meta" or (grad and arg.requires_grad):
                return True
    return False


def _call(op: Any, args: tuple) -> Any:
    kernel = direct_kernel(op)
    if kernel is not None and not dispatcher_needed(args):
        return kernel(*args)
    return op(*args)


def call_with_backend(backend: str | None, op, *args: object):
    """Call ``op(*args)``, preferring the backend named ``backend`` when it is given.

    This is how the public ``backend=`` argument works; without it the call stays a plain
    op call that ``torch.compile`` traces without a graph break. In eager mode the op's
    kernel is called directly when the dispatcher would add nothing (module docstring).
    """
    if backend is None:
        return _call(op, args)
    from ..backends._registry import use_backend

    with use_backend(backend):
        return _call(op, args)
