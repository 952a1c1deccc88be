"""The conformance suite run on the reference backend, exactly as a backend author runs it.

The reference is the oracle, so this mostly proves the suite's machinery end to end: every
declared variant is generated, routed, compared and opchecked, and the goldens apply.
"""

from kbit.testing import BackendConformance


class TestReferenceConformance(BackendConformance):
    backend = "reference"
    device = "cpu"
