"""What bitsandbytes' ``cextension`` module tells about the native library, told for kbit.

Downstream code (and the bitsandbytes test suite) reads a few flags from here to decide
which paths to test. kbit has no native bitsandbytes library: its ops are served by the
backends of :mod:`kbit.backends` (``kbit info`` lists them), so the flags describe that
and nothing here claims a CUDA library was loaded.
"""

from __future__ import annotations

from typing import NoReturn

__all__ = ["BNB_BACKEND", "COMPILED_WITH_CUDA", "HIP_ENVIRONMENT", "ROCM_WARP_SIZE_64", "NoNativeLibrary", "lib"]

#: Name of what serves the ops: kbit's backend registry, not a native library build.
BNB_BACKEND = "kbit"
#: kbit ships no compiled bitsandbytes CUDA library (its CUDA backend builds kernels at run
#: time through CuPy, when present).
COMPILED_WITH_CUDA = False
#: bitsandbytes changes defaults on ROCm (4-bit blocksize 128); kbit never does, so code
#: that branches on this flag must take the portable path.
HIP_ENVIRONMENT = False
#: Only meaningful with ``HIP_ENVIRONMENT``.
ROCM_WARP_SIZE_64 = False


class NoNativeLibrary:
    """Stands where bitsandbytes keeps its ctypes handle to the native library.

    Reading ``compiled_with_cuda`` gives False; any other attribute (a native entry point
    such as ``cquantize_blockwise_fp32``) raises ``AttributeError`` naming the kbit API that
    serves the operation instead, rather than pretending a library is loaded.
    """

    compiled_with_cuda = COMPILED_WITH_CUDA

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"kbit has no native bitsandbytes library, so it has no entry point {name!r}; "
            "call the kbit.functional API (dispatched to the backends `kbit info` lists) instead"
        )

    def __repr__(self) -> str:
        return "<kbit: no native bitsandbytes library; ops are served by kbit.backends>"


#: The stand-in for the native library handle.
lib = NoNativeLibrary()
