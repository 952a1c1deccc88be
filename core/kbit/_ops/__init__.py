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
autograd to record), :func:`call_with_backend` calls the op's kernel function directly.
It is the same function the dispatcher would run, backend resolution and result checks
included, so the results are identical. For an op that writes into arguments (the
optimizer updates, ``out=`` buffers) the direct path also does the one thing torch's
ADInplaceOrView kernel does for a custom op: it bumps the version counter of each tensor
the schema marks as written, which autograd's checks and kbit's caches rely on. Under
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
#: op -> (its kernel function, the positions of the arguments it writes), or None.
_direct_kernels: dict[Any, Optional[tuple[Callable[..., Any], tuple[int, ...]]]] = {}


def direct_kernel(op: Any) -> Optional[tuple[Callable[..., Any], tuple[int, ...]]]:
    """The kernel function of custom op ``op``, for calls without the dispatcher, and the
    positions of the arguments its schema marks as written (their version counters must be
    bumped after a direct call, as the dispatcher does); None for anything else."""
    try:
        return _direct_kernels[op]
    except KeyError:
        pass
    direct = None
    # A private attribute of torch.library: a torch without it keeps the dispatcher path.
    kernel = getattr(op, "_init_fn", None) if isinstance(op, CustomOpDef) else None
    if kernel is not None:
        arguments = op._opoverload._schema.arguments
        written = tuple(i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write)
        direct = (kernel, written)
    _direct_kernels[op] = direct
    return direct


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


def write_stamp(tensor: torch.Tensor) -> Optional[tuple[int, int]]:
    """What changes when ``tensor`` is written through torch: its version counter (bumped by
    every in-place write, the direct path's included) and data pointer (``.data``
    reassigned). None for an inference tensor, which has no version counter and can be
    written unseen in inference mode: nothing derived from it may be cached."""
    if tensor.is_inference():
        return None
    return tensor._version, tensor.data_ptr()


def _call(op: Any, args: tuple) -> Any:
    # dispatcher_needed first: while compiling it says so before direct_kernel's schema
    # inspection, which dynamo cannot trace, is reached.
    direct = None if dispatcher_needed(args) else direct_kernel(op)
    if direct is None:
        return op(*args)
    kernel, written = direct
    result = kernel(*args)
    for position in written:
        value = args[position] if position < len(args) else None
        if isinstance(value, (list, tuple)):
            value = [v for v in value if isinstance(v, torch.Tensor)]
        if value is not None:
            # inference tensors have no version counter; torch skips them
            torch.autograd.graph.increment_version(value)
    return result


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
