"""``bitsandbytes.supported_torch_devices``: the device types kbit serves in this process."""

from __future__ import annotations

import torch

import kbit

__all__ = ["supported_torch_devices"]

# The op whose availability stands for "kbit works on this device": transformers asks
# before loading a 4-bit or 8-bit model, and 4-bit quantization is what loading does first.
_PROBE = ("quantize_4bit", "float32", {"blocksize": 64, "quant_type": "nf4", "quant_storage": "uint8"})


def _usable_device_types() -> list[str]:
    """``cpu`` and the accelerator PyTorch can use here, if any."""
    types = ["cpu"]
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is not None:
        types.append(accelerator.type)
    return types


def supported_torch_devices() -> set[str]:
    """Device types of this machine that kbit can serve, as a set of names (``{"cpu"}``, ...).

    A device type counts when kbit's registry resolves 4-bit quantization for it: through a
    backend that declares it, or through the reference backend's fallback (pure PyTorch,
    slower, warned about) unless ``KBIT_FALLBACK=error`` forbids that. Device types PyTorch
    cannot use here are not listed: transformers intersects this set with the available
    devices, and kbit could not probe them.
    """
    op, dtype, params = _PROBE
    supported = set()
    for device_type in _usable_device_types():
        try:
            kbit.backends.resolve(op, device_type, dtype, **params)
        except kbit.NoBackendError:
            continue
        supported.add(device_type)
    return supported
