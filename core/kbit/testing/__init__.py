"""Test support for kbit and for backend authors.

``kbit.testing.tolerances`` holds the one table of numerical quality bars every kbit test
(and every backend's conformance run) compares against.
"""

from . import tolerances

__all__ = ["tolerances"]
