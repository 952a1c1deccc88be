"""torch custom ops in the ``kbit`` namespace, one module per op family.

Each op is defined with ``torch.library.custom_op`` and a fake (meta) implementation, so
``torch.compile`` sees one opaque node with known output shapes. The op's single kernel
asks the registry which backend serves the call and forwards to it: torch.library is the
compile boundary, the registry is the selector (torch allows one kernel per dispatch key;
the registry can rank several backends for one device).
"""

from __future__ import annotations

import torch

from ..backend import Backend
from ..backends._registry import REGISTRY, note_call


def backend_for(op: str, like: torch.Tensor, dtype: torch.dtype | None = None, **params: object) -> Backend:
    """The backend serving ``op`` for tensors like ``like`` (its device; ``dtype`` or its dtype)."""
    resolution = REGISTRY.resolve(op, like.device.type, dtype or like.dtype, warn=True, **params)
    note_call(op, resolution.device_type, resolution.name)
    return resolution.backend


def call_with_backend(backend: str | None, op, *args: object):
    """Call ``op(*args)``, preferring the backend named ``backend`` when it is given.

    This is how the public ``backend=`` argument works; without it the call stays a plain
    op call that ``torch.compile`` traces without a graph break.
    """
    if backend is None:
        return op(*args)
    from ..backends._registry import use_backend

    with use_backend(backend):
        return op(*args)
