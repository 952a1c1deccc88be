"""Throughput of 8-bit blockwise quantize / dequantize per backend.

Usage: python benchmarks/bench_blockwise8.py [--numel N] [--blocksize B] [--backend NAME ...]

Throughput counts the float32 side of the op (bytes read by quantize, bytes written by
dequantize), so both directions are comparable. One run, all backends side by side.
"""

from __future__ import annotations

import argparse

import torch
from _timing import best_time, gbps

import kbit
import kbit.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--blocksize", type=int, default=4096)
    parser.add_argument("--backend", action="append", help="backend(s) to time (default: every available one)")
    args = parser.parse_args()

    names = args.backend or [b for b in kbit.backends.available() if "quantize_blockwise" in kbit.backends.get(b).manifest.ops]
    A = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    float_bytes = A.numel() * A.element_size()
    print(f"{args.numel} float32 values, blocksize {args.blocksize}, torch threads {torch.get_num_threads()}")
    print(f"{'backend':<12} {'quantize GB/s':>14} {'dequantize GB/s':>16}")
    for name in names:
        codes, state = F.quantize_blockwise(A, blocksize=args.blocksize, backend=name)
        quantize = best_time(lambda n=name: F.quantize_blockwise(A, blocksize=args.blocksize, backend=n))
        dequantize = best_time(lambda n=name, c=codes, s=state: F.dequantize_blockwise(c, s, backend=n))
        print(f"{name:<12} {gbps(float_bytes, quantize):>14.3f} {gbps(float_bytes, dequantize):>16.3f}")


if __name__ == "__main__":
    main()
