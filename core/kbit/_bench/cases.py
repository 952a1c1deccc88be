"""What ``kbit bench`` times: one :class:`Case` per op variant, with the inputs it builds,
the bytes it moves, and how each implementation family runs it.

Families: ``"kbit"`` (the public kbit API, with one kbit backend preferred and no fallback),
``"bitsandbytes"`` (the incumbent's public API) and ``"torch"`` (the dense or 32-bit
PyTorch baseline the op replaces). This module imports only torch at load time: the
incumbent's rows run in a worker process whose interpreter may not have kbit; each runner
imports its library when it runs.

A runner takes ``(ctx, inputs)`` and returns the zero-argument callable to time, doing its
one-off preparation (quantizing a weight, building an optimizer and its state) first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import torch

__all__ = ["CASES", "Case", "Context", "OPS", "case_ids", "parameter_shapes"]

#: Elements of the bandwidth ops' input by default (16 Mi float32 = 64 MiB), as in the issue.
DEFAULT_SIZE = 16 * 1024 * 1024

Runner = Callable[["Context", dict], Callable[[], object]]


@dataclasses.dataclass(frozen=True)
class Context:
    """Where and how big: ``size`` elements for the bandwidth ops (the optimizers step
    ``3 * size`` parameters, the Linear4bit layer is ``width`` square)."""

    size: int
    device: str = "cpu"
    seed: int = 0

    @property
    def width(self) -> int:
        """Side of the Linear4bit layer: 4096 at the default size, smaller with ``size``."""
        side = 2 ** int(math.log2(max(math.isqrt(self.size), 64)))
        return min(4096, side)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        """Seeded normal values on the device."""
        generator = torch.Generator().manual_seed(self.seed)
        values = torch.randn(shape, generator=generator)
        if scale != 1.0:
            values.mul_(scale)
        return values.to(dtype=dtype, device=self.device)


@dataclasses.dataclass(frozen=True)
class Case:
    """One row group of the table: an op variant and how each family runs it.

    ``kind`` is ``"bandwidth"`` (GB/s and the share of memcpy are meaningful),
    ``"latency"`` (a small call, reported in microseconds), ``"layer"`` (compared with the
    dense torch layer) or ``"optimizer"`` (compared with torch's Adam; peak memory measured).
    ``moved`` gives the bytes a call reads and writes, for the bandwidth figures.
    """

    id: str
    op: str
    variant: str
    kind: str
    setup: Callable[[Context], dict]
    runners: dict[str, Runner]
    moved: Optional[Callable[[Context], int]] = None


def _kbit_functional():
    import kbit.functional as F

    return F


def _bnb_functional():
    import bitsandbytes.functional as F

    return F


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------ 8-bit blockwise
def _blockwise_cases() -> list[Case]:
    cases = []
    for blocksize in (4096, 256):
        dtype = torch.float32

        def setup(ctx: Context, dtype: torch.dtype = dtype) -> dict:
            return {"A": ctx.randn((ctx.size,), dtype)}

        def quantize(family: str, blocksize: int = blocksize) -> Runner:
            def runner(ctx: Context, inputs: dict) -> Callable[[], object]:
                F = _kbit_functional() if family == "kbit" else _bnb_functional()
                A = inputs["A"]
                return lambda: F.quantize_blockwise(A, blocksize=blocksize)

            return runner

        def dequantize(family: str, blocksize: int = blocksize) -> Runner:
            def runner(ctx: Context, inputs: dict) -> Callable[[], object]:
                F = _kbit_functional() if family == "kbit" else _bnb_functional()
                codes, state = F.quantize_blockwise(inputs["A"], blocksize=blocksize)
                return lambda: F.dequantize_blockwise(codes, state)

            return runner

        def moved(ctx: Context, blocksize: int = blocksize, dtype: torch.dtype = dtype) -> int:
            return ctx.size * _itemsize(dtype) + ctx.size + 4 * math.ceil(ctx.size / blocksize)

        variant = f"float32, blocksize {blocksize}"
        for op, make in (("quantize_blockwise", quantize), ("dequantize_blockwise", dequantize)):
            cases.append(
                Case(f"{op}/bs{blocksize}", op, variant, "bandwidth", setup,
                     {"kbit": make("kbit"), "bitsandbytes": make("bitsandbytes")}, moved)  # fmt: skip
            )
    return cases


# ----------------------------------------------------------------------------- 4-bit
def _quant4_cases() -> list[Case]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):

        def setup(ctx: Context, dtype: torch.dtype = dtype) -> dict:
            return {"A": ctx.randn((ctx.size,), dtype)}

        def quantize(family: str) -> Runner:
            def runner(ctx: Context, inputs: dict) -> Callable[[], object]:
                F = _kbit_functional() if family == "kbit" else _bnb_functional()
                A = inputs["A"]
                return lambda: F.quantize_4bit(A, blocksize=64, quant_type="nf4")

            return runner

        def dequantize(family: str) -> Runner:
            def runner(ctx: Context, inputs: dict) -> Callable[[], object]:
                F = _kbit_functional() if family == "kbit" else _bnb_functional()
                packed, state = F.quantize_4bit(inputs["A"], blocksize=64, quant_type="nf4")
                return lambda: F.dequantize_4bit(packed, state)

            return runner

        def moved(ctx: Context, dtype: torch.dtype = dtype) -> int:
            return ctx.size * _itemsize(dtype) + ctx.size // 2 + 4 * math.ceil(ctx.size / 64)

        name = str(dtype).removeprefix("torch.")
        for op, make in (("quantize_4bit", quantize), ("dequantize_4bit", dequantize)):
            cases.append(
                Case(f"{op}/{name}", op, f"nf4, {name}, blocksize 64", "bandwidth", setup,
                     {"kbit": make("kbit"), "bitsandbytes": make("bitsandbytes")}, moved)  # fmt: skip
            )
    return cases


# --------------------------------------------------------------------------- Linear4bit
def _linear_cases() -> list[Case]:
    cases = []
    for batch in (1, 16):
        for dtype in (torch.bfloat16, torch.float32):

            def setup(ctx: Context, batch: int = batch, dtype: torch.dtype = dtype) -> dict:
                torch.manual_seed(ctx.seed)
                dense = torch.nn.Linear(ctx.width, ctx.width, bias=False)
                return {"dense": dense, "x": ctx.randn((batch, ctx.width), dtype)}

            def quantized(family: str, dtype: torch.dtype = dtype) -> Runner:
                def runner(ctx: Context, inputs: dict) -> Callable[[], object]:
                    if family == "kbit":
                        import kbit.nn as nn
                    else:
                        import bitsandbytes.nn as nn
                    layer = nn.Linear4bit(ctx.width, ctx.width, bias=False, compute_dtype=dtype, quant_type="nf4")
                    layer.load_state_dict(inputs["dense"].state_dict())
                    layer = layer.to(ctx.device).eval()  # quantized on the move
                    x = inputs["x"]
                    return _no_grad(lambda: layer(x))

                return runner

            def dense(ctx: Context, inputs: dict, dtype: torch.dtype = dtype) -> Callable[[], object]:
                layer = torch.nn.Linear(ctx.width, ctx.width, bias=False).to(device=ctx.device, dtype=dtype)
                layer.load_state_dict(inputs["dense"].state_dict())
                x = inputs["x"]
                return _no_grad(lambda: layer(x))

            name = str(dtype).removeprefix("torch.")
            cases.append(
                Case(f"linear4bit/b{batch}/{name}", "Linear4bit forward", f"nf4, batch {batch}, {name}", "layer",
                     setup, {"kbit": quantized("kbit"), "bitsandbytes": quantized("bitsandbytes"), "torch": dense})
            )  # fmt: skip
    return cases


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return fn()

    return call


# -------------------------------------------------------------------------------- int8
def _int8_cases() -> list[Case]:
    def setup(ctx: Context) -> dict:
        columns = min(4096, ctx.size)
        return {"A": ctx.randn((ctx.size // columns, columns))}

    def quantize(family: str) -> Runner:
        def runner(ctx: Context, inputs: dict) -> Callable[[], object]:
            F = _kbit_functional() if family == "kbit" else _bnb_functional()
            A = inputs["A"]
            return lambda: F.int8_vectorwise_quant(A)

        return runner

    def moved(ctx: Context) -> int:
        return 5 * ctx.size

    return [
        Case("int8_vectorwise_quant", "int8_vectorwise_quant", "float32, 4096 columns", "bandwidth", setup,
             {"kbit": quantize("kbit"), "bitsandbytes": quantize("bitsandbytes")}, moved)
    ]  # fmt: skip


# ---------------------------------------------------------------------------- optimizers
#: 8-bit optimizers timed: (class name in both libraries, constructor arguments).
OPTIMIZERS_8BIT: tuple[tuple[str, dict[str, Any]], ...] = (
    ("Adam8bit", {"lr": 1e-4}),
    ("AdEMAMix8bit", {"lr": 1e-4}),
    ("Lion8bit", {"lr": 1e-5}),
    ("SGD8bit", {"lr": 1e-3, "momentum": 0.9}),
    ("RMSprop8bit", {"lr": 1e-4}),
    ("Adagrad8bit", {"lr": 1e-3}),
    ("LAMB8bit", {"lr": 1e-4}),
    ("LARS8bit", {"lr": 1e-3, "momentum": 0.9}),
)


def parameter_shapes(ctx: Context) -> list[tuple[int, ...]]:
    """Shapes of the parameters an optimizer steps: ``3 * size`` elements (50.3M at the
    default size, 12 matrices of 2048 x 2048), or one flat tensor when that is smaller."""
    total = 3 * ctx.size
    side = 2048
    if total < side * side:
        return [(total,)]
    return [(side, side)] * (total // (side * side))


def _optimizer_setup(ctx: Context) -> dict:
    generator = torch.Generator().manual_seed(ctx.seed)
    params = []
    for shape in parameter_shapes(ctx):
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(ctx.device) * 0.02)
        p.grad = torch.randn(shape, generator=generator).to(ctx.device) * 1e-3
        params.append(p)
    return {"params": params}


def _optimizer_cases() -> list[Case]:
    cases = []
    for name, kwargs in OPTIMIZERS_8BIT:

        def library_optimizer(family: str, name: str = name, kwargs: dict = kwargs) -> Runner:
            def runner(ctx: Context, inputs: dict) -> Callable[[], object]:
                if family == "kbit":
                    import kbit.optim as optim
                else:
                    import bitsandbytes.optim as optim
                optimizer = getattr(optim, name)(inputs["params"], **kwargs)
                optimizer.step()  # allocates the state
                inputs["optimizer"] = optimizer
                return optimizer.step

            return runner

        runners: dict[str, Runner] = {"kbit": library_optimizer("kbit"), "bitsandbytes": library_optimizer("bitsandbytes")}
        if name == "Adam8bit":

            def fused_adam(ctx: Context, inputs: dict) -> Callable[[], object]:
                optimizer = torch.optim.Adam(inputs["params"], lr=1e-4, fused=True)
                optimizer.step()
                inputs["optimizer"] = optimizer
                return optimizer.step

            runners["torch"] = fused_adam
        variant = "vs torch Adam(fused=True)" if name == "Adam8bit" else "8-bit state"
        cases.append(Case(f"optimizer/{name}", f"{name} step", variant, "optimizer", _optimizer_setup, runners))
    return cases


# ----------------------------------------------------------------------------- small call
def _small_call_cases() -> list[Case]:
    def setup(ctx: Context) -> dict:
        return {"A": ctx.randn((4096,))}

    def quantize(family: str) -> Runner:
        def runner(ctx: Context, inputs: dict) -> Callable[[], object]:
            F = _kbit_functional() if family == "kbit" else _bnb_functional()
            A = inputs["A"]
            return lambda: F.quantize_blockwise(A)

        return runner

    return [
        Case("small_call", "small call", "quantize_blockwise, 4096 elements", "latency", setup,
             {"kbit": quantize("kbit"), "bitsandbytes": quantize("bitsandbytes")})
    ]  # fmt: skip


CASES: tuple[Case, ...] = (
    *_blockwise_cases(),
    *_quant4_cases(),
    *_linear_cases(),
    *_int8_cases(),
    *_optimizer_cases(),
    *_small_call_cases(),
)

#: ``--ops`` names: every op group, and the optimizer group as ``optimizers``.
OPS: tuple[str, ...] = (
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_4bit",
    "dequantize_4bit",
    "linear4bit",
    "int8_vectorwise_quant",
    "optimizers",
    "small_call",
)


def case_ids(ops: Optional[list[str]] = None) -> list[str]:
    """Ids of the cases selected by ``--ops`` names (all when None)."""
    if ops is None:
        return [case.id for case in CASES]
    wanted = set(ops)
    selected = []
    for case in CASES:
        group = case.id.split("/")[0]
        group = {"optimizer": "optimizers"}.get(group, group)
        if group in wanted:
            selected.append(case.id)
    return selected
