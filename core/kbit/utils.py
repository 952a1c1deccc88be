"""Helpers of the bitsandbytes ``utils`` module that downstream code imports.

``from kbit.utils import pack_dict_to_tensor`` (or, through the compat distribution,
``from bitsandbytes.utils import ...``) finds the same names: the JSON packing of quant
states, the int8 weight-layout codes, ``replace_linear`` and the outlier-dimension probe.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from .functional._utils import pack_dict_to_tensor, unpack_tensor_to_dict

__all__ = [
    "INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING",
    "LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING",
    "find_outlier_dims",
    "pack_dict_to_tensor",
    "replace_linear",
    "sync_gpu",
    "unpack_tensor_to_dict",
]

#: ``weight_format`` codes of int8 weight layouts in checkpoints. kbit stores and reads
#: ``"row"`` (0) only; the tiled GPU layouts are listed so a checkpoint naming one can be
#: recognised and refused with its name.
LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = {"row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}
#: Layout name of each ``weight_format`` code.
INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = {code: name for name, code in LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING.items()}


def replace_linear(
    model: torch.nn.Module,
    linear_replacement: Callable[[int, int, bool], torch.nn.Module],
    skip_modules: Iterable[str] = ("lm_head",),
    copy_weights: bool = False,
    post_processing_function: Optional[str] = None,
) -> torch.nn.Module:
    """Replace every ``torch.nn.Linear`` of ``model`` (recursively) by ``linear_replacement(in, out, bias)``.

    Children whose attribute name is in ``skip_modules`` keep their layer. With
    ``copy_weights`` the new layer takes the old one's ``weight`` and ``bias`` parameters
    (a quantizing layer quantizes them on its first move to a device). When
    ``post_processing_function`` names a method of the replaced layer, it is called with
    that layer afterwards. Returns ``model`` (changed in place).
    """
    skip = set(skip_modules)
    for name, child in list(model.named_children()):
        if any(True for _ in child.children()):
            replace_linear(child, linear_replacement, skip, copy_weights, post_processing_function)
        if not isinstance(child, torch.nn.Linear) or name in skip:
            continue
        replacement = linear_replacement(child.in_features, child.out_features, child.bias is not None)
        if copy_weights:
            replacement.weight = child.weight
            replacement.bias = child.bias
        model._modules[name] = replacement
        hook = getattr(child, post_processing_function, None) if post_processing_function else None
        if callable(hook):
            hook(child)
    return model


def find_outlier_dims(
    weight: torch.Tensor, reduction_dim: int = 0, zscore: float = 4.0, topk: Optional[int] = None, rdm: bool = False
) -> torch.Tensor:
    """Indices of the hidden dimensions of ``weight`` whose spread stands out.

    For each dimension kept after reducing over ``reduction_dim``, the standard deviation
    of its values is computed; a dimension is an outlier when that deviation lies more than
    ``zscore`` standard deviations above the mean deviation. ``topk`` returns the ``topk``
    largest deviations instead, and ``rdm`` ``topk`` random dimensions (a baseline).
    """
    if rdm:
        return torch.randint(0, weight.shape[1], size=(topk,), device=weight.device).long()
    spread = weight.float().std(reduction_dim)
    if topk is not None:
        return torch.topk(spread.abs(), k=topk, dim=0).indices
    standardized = (spread - spread.mean()) / spread.std()
    return torch.nonzero(standardized > zscore).reshape(-1)


def sync_gpu(t: torch.Tensor) -> None:
    """Wait for the work queued on ``t``'s accelerator (nothing to wait for on CPU)."""
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    elif t.device.type == "xpu":
        torch.xpu.synchronize(t.device)
