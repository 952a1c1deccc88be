"""Say so when the ``bitsandbytes`` metadata found is not this distribution's."""

from __future__ import annotations

import warnings
from importlib import metadata

from kbit import KbitWarning

__all__ = ["report_other_distribution"]


def report_other_distribution(own_version: str) -> None:
    """Warn when ``importlib.metadata`` reports a ``bitsandbytes`` other than this one.

    pip keeps one distribution per name, so this happens only when two environments are
    mixed (a real bitsandbytes in user site-packages or on ``PYTHONPATH`` besides this
    one): libraries would then read the other one's version while importing kbit's code.
    """
    try:
        found = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return  # imported from a source tree, nothing installed to disagree with
    if found != own_version:
        warnings.warn(
            f"the 'bitsandbytes' import name is served by kbit's compatibility package ({own_version}), "
            f"but the installed metadata says bitsandbytes {found}: two environments are mixed. "
            "Uninstall one of them (pip uninstall bitsandbytes) so libraries see what they import.",
            KbitWarning,
            stacklevel=3,
        )
