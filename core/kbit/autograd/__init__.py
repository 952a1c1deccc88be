"""Autograd functions for quantized matmuls (``kbit.matmul``, ``kbit.matmul_4bit``).

Each matmul family lives in its own private submodule and is re-exported here and at the
top level of ``kbit``.
"""

__all__: list[str] = []

from ._matmul8bit import MatmulLtState, matmul  # noqa: E402

__all__ += ["MatmulLtState", "matmul"]
