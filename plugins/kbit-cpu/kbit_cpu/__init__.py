"""kbit-cpu: kbit's native CPU backend.

OpenMP C kernels (``csrc/``) compiled per instruction set (AVX-512, AVX2, portable) into one
library that is opened with ctypes and called on tensor data pointers; outputs are
allocated by torch. ``_manifest.py`` declares what the backend serves (kbit finds it
through the ``kbit.backends`` entry point), ``_library.py`` opens the library,
``backend.py`` is the :class:`kbit.backend.Backend`. Importing this package does nothing.
"""

__version__ = "0.1.0"
