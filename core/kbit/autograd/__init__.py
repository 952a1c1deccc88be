"""Autograd functions for quantized matmuls (``kbit.matmul``, ``kbit.matmul_4bit``).

Each matmul family lives in its own private submodule and is re-exported here and at the
top level of ``kbit``.
"""

from ._matmul4bit import matmul_4bit
from ._matmul8bit import MatmulLtState, matmul

__all__ = ["MatmulLtState", "matmul", "matmul_4bit"]
