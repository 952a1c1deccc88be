"""kbit: k-bit quantization and 8-bit optimizers for PyTorch, with pluggable backends.

A drop-in for the bitsandbytes API (``import kbit as bnb``): 8-bit blockwise quantization,
NF4/FP4 4-bit weights, LLM.int8(), 8-bit optimizers. Every quantization and optimizer call
is dispatched to a backend found through the ``kbit.backends`` entry-point group; see
:mod:`kbit.backends`.

Importing kbit imports no backend and probes no device: backends are discovered on first
use.
"""

from . import autograd, backends, cextension, functional, nn, optim, utils
from ._errors import (
    BackendError,
    BackendNotFoundError,
    BackendResultError,
    BackendUnavailableError,
    KbitError,
    KbitFallbackWarning,
    KbitPagedMemoryWarning,
    KbitPluginWarning,
    KbitTypeError,
    KbitValueError,
    KbitWarning,
    NoBackendError,
    QuantStateError,
    UnsupportedOpError,
)
from ._version import __version__
from .autograd import MatmulLtState, matmul, matmul_4bit

#: Capabilities of this build, for code that feature-tests (bitsandbytes convention).
features = {"multi_backend"}

__all__ = [
    "__version__",
    "features",
    "autograd",
    "backends",
    "cextension",
    "functional",
    "nn",
    "optim",
    "utils",
    "matmul",
    "matmul_4bit",
    "MatmulLtState",
    "BackendError",
    "BackendNotFoundError",
    "BackendResultError",
    "BackendUnavailableError",
    "KbitError",
    "KbitFallbackWarning",
    "KbitPagedMemoryWarning",
    "KbitPluginWarning",
    "KbitTypeError",
    "KbitValueError",
    "KbitWarning",
    "NoBackendError",
    "QuantStateError",
    "UnsupportedOpError",
]
