"""kbit's CUDA backend: CuPy RawKernels for the performance-critical ops.

Nothing here imports CuPy at import time. The registry builds :class:`kbit_cuda.backend.
CudaBackend` on first use, and the backend reports itself unavailable, with the reason,
when CuPy or a CUDA device is missing. Kernels live in ``kernels/*.cu`` as package data.
"""
