"""What ``Int8Params`` and ``Params4bit`` share: a Parameter that carries quantization state.

A quantized weight is its data plus side information (int8 scales, a 4-bit
``QuantState``) held as Python attributes. Generic PyTorch code loses those attributes
unless the parameter cooperates:

- ``Parameter(t)`` (which ``Module.to`` uses for moves to ``meta`` and under
  ``torch.__future__.set_overwrite_module_params_on_conversion(True)``) calls
  ``t.detach()`` and requires it to keep the type;
- ``copy.deepcopy`` and pickling rebuild the object from scratch;
- ``Module.to_empty`` and moves off ``meta`` replace the parameter by a plain one.

:class:`QuantizedParameter` handles the first two for any subclass that can be rebuilt as
``cls(data, requires_grad, **attributes)``; :class:`QuantizedWeightModule` handles the
third for a module whose ``weight`` is such a parameter, and keeps the side information
on the weight's device.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch

from .._errors import KbitTypeError

__all__ = ["QuantizedParameter", "QuantizedWeightModule", "follow_device"]


def follow_device(tensor: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """``tensor`` on ``device``; a ``meta`` tensor (no values to copy) becomes an empty one there."""
    if tensor is None or tensor.device == device:
        return tensor
    if tensor.device.type == "meta":
        return torch.empty_like(tensor, device=device)
    return tensor.to(device)


def _rebuild(cls: type, data: torch.Tensor, requires_grad: bool, attributes: dict[str, Any]) -> "QuantizedParameter":
    # Module-level so pickle (torch.save of a whole module) can find it by name.
    return cls(data, requires_grad, **attributes)


class QuantizedParameter(torch.nn.Parameter):
    """Base of parameters whose quantization state lives in attributes beside the data.

    Subclasses name the constructor keywords that rebuild that state in
    ``_OWN_ATTRIBUTES`` and move it in :meth:`_follow_data_device`.

    Other keyword arguments of the constructor become attributes too, and every attribute
    in ``__dict__`` travels with the parameter through copies, ``detach``, moves and
    pickling: transformers and peft rebuild weights as ``type(p)(data, **p.__dict__)``, so
    whatever other tooling (DeepSpeed, FSDP, accelerate) set on a weight must be accepted
    back and kept.
    """

    #: Constructor keywords holding this parameter's quantization state.
    _OWN_ATTRIBUTES: tuple[str, ...] = ()

    def _keep_attributes(self, op: str, extra: dict[str, Any]) -> None:
        """Set the constructor's extra keyword arguments as attributes."""
        for name, value in extra.items():
            try:
                setattr(self, name, value)
            except AttributeError as exc:  # a read-only view of the quantization state
                raise KbitTypeError(op, name, "a keyword argument", f"no {name!r} ({exc})") from None

    def _attributes(self) -> dict[str, Any]:
        """Keyword arguments that, with data and requires_grad, rebuild this parameter."""
        own = {name: getattr(self, name) for name in self._OWN_ATTRIBUTES}
        if torch.compiler.is_compiling():
            # Dynamo cannot read a tensor subclass's __dict__; inside a compiled region
            # copies are transient (``B.detach()`` to quantize), so they need no extras.
            return own
        extra = {name: value for name, value in self.__dict__.items() if name not in self._OWN_ATTRIBUTES}
        return {**own, **extra}

    def _follow_data_device(self) -> None:
        """Put the side information on the data's device (after ``.data`` was swapped)."""
        raise NotImplementedError

    def _with_data(self, data: torch.Tensor, requires_grad: Optional[bool] = None) -> "QuantizedParameter":
        """A parameter of the same type holding ``data`` and sharing this one's state."""
        if data is self:
            return self
        grad = self.requires_grad if requires_grad is None else requires_grad
        return type(self)(data, grad, **self._attributes())

    def detach(self) -> "QuantizedParameter":
        """A detached alias that keeps the type and shares the quantization state."""
        return type(self)(torch.Tensor.detach(self), False, **self._attributes())

    def __deepcopy__(self, memo: dict) -> "QuantizedParameter":
        if id(self) in memo:
            return memo[id(self)]
        # A back reference to a module is not copied: it is the copy of that module when the
        # module itself is being deep-copied (already in ``memo``), else the same module.
        attributes = {
            name: memo.get(id(value), value) if isinstance(value, torch.nn.Module) else copy.deepcopy(value, memo)
            for name, value in self._attributes().items()
        }
        result = type(self)(self.data.clone(memory_format=torch.preserve_format), self.requires_grad, **attributes)
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, protocol: int):
        # Parameter's own pickling rebuilds a plain Parameter; keep the class and the state.
        return _rebuild, (type(self), self.data, self.requires_grad, self._attributes())


class QuantizedWeightModule(torch.nn.Module):
    """Mix-in keeping a module's :class:`QuantizedParameter` ``weight`` intact through ``_apply``.

    ``Module.to`` / ``to_empty`` / ``cuda`` ... swap the weight's data in place, or, when
    that is impossible (off ``meta``, a rebuilt parameter), install a plain ``Parameter``.
    Afterwards the weight is wrapped again with its previous settings and state, and its
    side information is moved to where the data now lives. Place it before the
    ``torch.nn`` base class.
    """

    def _apply(self, fn, recurse: bool = True):
        before = self._parameters.get("weight")
        module = super()._apply(fn, recurse)
        after = self._parameters.get("weight")
        if isinstance(before, QuantizedParameter) and after is not None:
            if not isinstance(after, type(before)):
                after = before._with_data(after.data, after.requires_grad)
                self._parameters["weight"] = after
            after._follow_data_device()
        self._after_weight_change()
        return module

    def _after_weight_change(self) -> None:
        """Hook for subclasses that mirror the weight elsewhere."""

    def _load_rest_then_install(
        self,
        rest: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
        install: Optional[Callable[[], None]],
    ) -> None:
        """Let torch load every entry but the weight (``rest``), then run ``install``.

        ``install`` puts the new, already validated weight in place (None: the checkpoint
        has no weight). All or nothing: when torch reports an error for this module's
        entries (a bias of the wrong shape), whatever it copied is restored and ``install``
        does not run, so a failed ``load_state_dict`` leaves the module as it was. Missing
        keys are not errors here: torch reports them, and ``strict=False`` loads the rest.
        """
        own = [(name, t) for name, t in [*self._parameters.items(), *self._buffers.items()] if t is not None]
        saved = {name: (tensor, tensor.detach().clone()) for name, tensor in own if name != "weight"}
        errors = len(error_msgs)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if install is None:
            return  # the base class has recorded the weight as missing
        if prefix + "weight" in missing_keys:  # it was there, only not in ``rest``
            missing_keys.remove(prefix + "weight")
        if len(error_msgs) > errors:
            self._restore(saved)
            return
        install()

    def _restore(self, saved: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put back the tensors (objects and values) :meth:`_load_rest_then_install` saved."""
        for name, (tensor, values) in saved.items():
            table = self._parameters if name in self._parameters else self._buffers
            table[name] = tensor  # torch may have assigned a new object (assign=True)
            with torch.no_grad():
                tensor.copy_(values)
