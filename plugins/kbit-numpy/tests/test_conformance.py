"""The whole test suite a kbit backend needs: kbit's conformance suite, pointed at it.

Run with the plugin installed next to kbit: ``python -m pytest tests``.
``kbit conformance numpy`` runs the same tests without this file.
"""

from kbit.testing import BackendConformance


class TestNumpyConformance(BackendConformance):
    backend = "numpy"
    device = "cpu"
