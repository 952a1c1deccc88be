"""kbit-numpy: kbit's 8-bit blockwise and 4-bit quantization ops written in NumPy.

A second, independent implementation of the 8-bit format and the template for vendor
backends: ``_manifest.py`` declares what it implements, ``backend.py`` converts tensors at
the boundary, ``_kernels.py`` computes with NumPy only. kbit finds it through the
``kbit.backends`` entry point in ``pyproject.toml``; importing this package does nothing.
"""

__version__ = "0.1.0"
