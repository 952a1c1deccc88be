"""Throughput of 4-bit quantize / dequantize / matmul per backend, and checkpoint size.

Usage: python benchmarks/bench_quant4.py [--numel N] [--blocksize B] [--backend NAME ...]

Throughput counts the float side of the op (bytes read by quantize, bytes written by
dequantize), as bench_blockwise8.py does, so 8-bit and 4-bit numbers compare. The size
part saves a 4096x4096 ``Linear4bit`` state dict with ``torch.save`` and divides its size
by that of the same layer's bfloat16 ``torch.nn.Linear`` state dict. One run, printed.
"""

from __future__ import annotations

import argparse
import io

import torch
from _timing import best_time, gbps

import kbit
import kbit.functional as F


def _saved_size(state_dict: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getbuffer().nbytes


def throughput(numel: int, blocksize: int, names: list[str]) -> None:
    A = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    print(f"{numel} values, blocksize {blocksize}, torch threads {torch.get_num_threads()}")
    print(f"{'backend':<12} {'type':<5} {'quantize GB/s':>14} {'dequant f32 GB/s':>17} {'dequant bf16 GB/s':>18}")
    for name in names:
        for quant_type in ("nf4", "fp4"):
            kwargs = dict(blocksize=blocksize, quant_type=quant_type, backend=name)
            packed, state = F.quantize_4bit(A, **kwargs)
            quantize = best_time(lambda kw=kwargs: F.quantize_4bit(A, **kw))
            dequantize = best_time(lambda p=packed, s=state, n=name: F.dequantize_4bit(p, s, backend=n))
            state.dtype = torch.bfloat16
            dequantize16 = best_time(lambda p=packed, s=state, n=name: F.dequantize_4bit(p, s, backend=n))
            print(
                f"{name:<12} {quant_type:<5} {gbps(numel * 4, quantize):>14.3f} "
                f"{gbps(numel * 4, dequantize):>17.3f} {gbps(numel * 2, dequantize16):>18.3f}"
            )


def matmul(names: list[str]) -> None:
    layer = kbit.nn.LinearNF4(4096, 4096, compute_dtype=torch.bfloat16).to("cpu")
    weight = layer.weight
    print("\nmatmul_4bit, 4096x4096 NF4 weight, bf16 compute (ms per call)")
    for rows in (1, 32):
        x = torch.randn(rows, 4096, dtype=torch.bfloat16)
        for name in names:
            with kbit.backends.use_backend(name), torch.no_grad():
                seconds = best_time(lambda x=x: kbit.matmul_4bit(x, weight, weight.quant_state), repeats=3)
            print(f"  {name:<12} {rows:>3} row(s): {seconds * 1e3:8.2f}")


def checkpoint_size() -> None:
    torch.manual_seed(0)
    original = torch.nn.Linear(4096, 4096).to(torch.bfloat16)
    reference_size = _saved_size(original.state_dict())
    print(f"\n4096x4096 layer on disk (torch.save): bf16 nn.Linear {reference_size / 2**20:.2f} MiB")
    for compress in (True, False):
        layer = kbit.nn.LinearNF4(4096, 4096, compress_statistics=compress)
        layer.load_state_dict(original.state_dict())  # quantized on load
        size = _saved_size(layer.state_dict())
        label = "nested absmax" if compress else "float32 absmax"
        print(f"  Linear4bit NF4, {label:<14}: {size / 2**20:.2f} MiB, ratio {size / reference_size:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--backend", action="append", help="backend(s) to time (default: every available one)")
    args = parser.parse_args()
    names = args.backend or [b for b in kbit.backends.available() if "dequantize_4bit" in kbit.backends.get(b).manifest.ops]
    throughput(args.numel, args.blocksize, names)
    matmul(names)
    checkpoint_size()


if __name__ == "__main__":
    main()
