"""Checkpoint size of a 4-bit layer against the bfloat16 layer it replaces.

Usage: python benchmarks/bench_quant4.py

Saves a 4096x4096 ``Linear4bit`` state dict with ``torch.save`` and divides its size by
that of the same layer's bfloat16 ``torch.nn.Linear`` state dict. One run, printed.
(Throughput of the 4-bit ops and of ``Linear4bit`` is measured by ``kbit bench``.)
"""

from __future__ import annotations

import argparse
import io

import torch

import kbit


def _saved_size(state_dict: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getbuffer().nbytes


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
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    checkpoint_size()


if __name__ == "__main__":
    main()
