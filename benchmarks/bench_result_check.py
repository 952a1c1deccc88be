"""Per-call cost of checking a backend's results against the op's fake (meta) spec.

Usage: python benchmarks/bench_result_check.py [--calls N]

Every ``torch.ops.kbit`` op compares what its backend returned with the shapes, dtypes
and devices its spec says (``kbit._ops._results``) before the result reaches the caller.
This times that check alone (building the spec from the op's arguments and comparing),
for ops with one, two and five outputs and for an in-place op, on real results.
"""

from __future__ import annotations

import argparse
import time

import torch

import kbit  # noqa: F401  (registers the ops)
from kbit._ops import blockwise8, int8, quant4
from kbit._ops._results import checked
from kbit.backends import get


def _per_call_us(function, calls: int) -> float:
    for _ in range(calls // 10):  # warm-up
        function()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    reference = get("reference")
    A = torch.randn(4096)
    code = torch.linspace(-1, 1, 256)
    q_result = reference.quantize_blockwise(A, code=code, blocksize=256)
    four = reference.quantize_4bit(A, blocksize=64, quant_type="nf4", quant_storage=torch.uint8)
    X = torch.randn(16, 64)
    double = reference.int8_double_quant(X, threshold=0.0)
    cases = {
        "quantize_blockwise (2 outputs)": lambda: checked(
            "quantize_blockwise", reference, q_result, blockwise8._quantize_blockwise_out(A, code, 256, None)
        ),
        "quantize_4bit (2 outputs)": lambda: checked(
            "quantize_4bit", reference, four, quant4._quantize_4bit_out(A, 64, "nf4", torch.uint8)
        ),
        "int8_double_quant (5 outputs)": lambda: checked(
            "int8_double_quant", reference, double, int8._int8_double_quant_out(X, 0.0)
        ),
        "optimizer update (in place)": lambda: checked("optimizer_update_32bit", reference, None, None),
    }
    print(f"result check per call, best of 5 x {args.calls} calls:")
    for label, function in cases.items():
        print(f"  {label:32s} {_per_call_us(function, args.calls):6.2f} us")


if __name__ == "__main__":
    main()
