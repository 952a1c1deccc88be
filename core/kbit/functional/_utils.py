"""Small helpers of the bitsandbytes functional API."""

from __future__ import annotations

import ctypes
import json
from typing import Any, Iterable, Optional

import torch

from .._errors import KbitValueError, QuantStateError

__all__ = ["get_paged", "get_ptr", "has_avx512bf16", "is_on_gpu", "pack_dict_to_tensor", "unpack_tensor_to_dict"]


def get_ptr(A: Optional[torch.Tensor]) -> Optional[ctypes.c_void_p]:
    """The address of ``A``'s first element as a ``ctypes.c_void_p`` (``None`` for ``None``)."""
    if A is None:
        return None
    return ctypes.c_void_p(A.data_ptr())


def has_avx512bf16() -> bool:
    """Whether this CPU has the AVX512-BF16 instructions (a probe downstream code branches on).

    kbit's reference backend computes the same results either way; the answer is only
    information about the machine.
    """
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def get_paged(
    *shape: int, dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None
) -> torch.Tensor:
    """A zero-filled tensor of ``shape`` in paged (managed) memory, for paged optimizer state.

    ``device`` defaults to the first CUDA device when CUDA is available, else the CPU. The
    memory comes from a backend that declares the ``"paged_memory"`` feature for that
    device; where none does the tensor is ordinary memory, with a
    :class:`~kbit.KbitPagedMemoryWarning`. ``result.is_paged`` says which it got.
    """
    from ..optim._paging import paged_zeros  # the optimizers' allocator (imports the registry)

    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    return paged_zeros(tuple(shape), dtype, torch.device(device))


def is_on_gpu(tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """True when every given tensor lives on one and the same accelerator device.

    ``None`` entries are ignored. Tensors spread over several accelerator devices raise,
    because no kernel can take them together; an all-CPU list returns False.
    """
    devices = {t.device for t in tensors if t is not None}
    accelerators = {d for d in devices if d.type != "cpu"}
    if not accelerators:
        return False
    if len(devices) > 1:
        listed = ", ".join(sorted(str(d) for d in devices))
        raise KbitValueError("is_on_gpu", "tensors", listed, "all tensors must be on the same device")
    return True


def pack_dict_to_tensor(source: dict[str, Any]) -> torch.Tensor:
    """Encode a JSON-serialisable dict as a uint8 tensor of its UTF-8 JSON text."""
    text = json.dumps(source)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(tensor: torch.Tensor, key: str = "tensor") -> dict[str, Any]:
    """Decode a tensor made by :func:`pack_dict_to_tensor` back into a dict.

    Raises :class:`~kbit.QuantStateError` naming ``key`` when the bytes are not UTF-8, not
    JSON (truncated downloads produce exactly these; hostile files may nest brackets
    without end), not a JSON object, or not readable at all (a ``meta`` tensor).
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8:
        found = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise QuantStateError(key, f"expected a uint8 tensor of UTF-8 JSON, got {found}")
    if tensor.device.type == "meta":
        raise QuantStateError(key, "a meta tensor holds no bytes to read (load the checkpoint to a real device)")
    raw = bytes(tensor.detach().cpu().reshape(-1).tolist())
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QuantStateError(key, f"bytes are not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QuantStateError(key, f"not valid JSON ({exc.msg} at character {exc.pos}); truncated?") from None
    except RecursionError:
        # Hostile input: thousands of nested brackets exhaust the decoder's stack.
        raise QuantStateError(key, "JSON nested too deeply to be a quant state") from None
    if not isinstance(value, dict):
        raise QuantStateError(key, f"expected a JSON object, got {type(value).__name__}")
    return value
