"""Manifest of the CUDA backend.

It declares no ops yet: the kernels arrive op family by op family, and each family is added
here together with its kernels and their conformance run.
"""

from kbit.backend import API_VERSION, BackendManifest

MANIFEST = BackendManifest(
    name="cuda",
    api_version=API_VERSION,
    priority=100,
    device_types=("cuda",),
    factory="kbit_cuda.backend:CudaBackend",
    ops={},
    description="CuPy RawKernels compiled with NVRTC",
)
