"""kbit's reference backend: every op in plain, vectorised PyTorch.

It is the oracle the other backends are tested against and the fallback that serves any
device when no faster backend can. It favours clarity and exact agreement with the format
contract (``docs/formats.md``) over speed, but never loops over blocks or elements in
Python.

Importing this package is cheap; the registry imports :mod:`kbit_reference.backend` only
when the backend is first needed.
"""
