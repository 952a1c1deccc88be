"""Forward time of Linear8bitLt against torch.nn.Linear (default: 16x4096 by 4096x4096).

Usage: python benchmarks/bench_linear8bit.py [--batch B] [--in-features K] [--out-features N]
       [--dtype float32 --dtype bfloat16 ...] [--backend NAME] [--threads T]

Times (best of N, under torch.no_grad) the float layer and three Linear8bitLt variants built
from the same weights: frozen int8 weights (inference), frozen with outlier threshold 6.0,
and trainable float weights (re-quantized every call). Ratio = Linear8bitLt / nn.Linear.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import kbit
from kbit._bench.timing import time_call
from kbit.nn import Linear8bitLt


def _int8_layer(reference: torch.nn.Linear, has_fp16_weights: bool, threshold: float) -> Linear8bitLt:
    layer = Linear8bitLt(
        reference.in_features, reference.out_features, has_fp16_weights=has_fp16_weights, threshold=threshold
    )
    layer.load_state_dict(reference.state_dict())
    return layer.to("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--dtype", action="append", help="input dtype(s) (default: float32 and bfloat16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", help="backend to prefer (default: the registry's choice)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    reference = torch.nn.Linear(args.in_features, args.out_features)
    variants = {
        "int8 (frozen)": _int8_layer(reference, False, 0.0),
        "int8 threshold=6": _int8_layer(reference, False, 6.0),
        "int8 (trainable)": _int8_layer(reference, True, 0.0),
    }
    preference = kbit.backends.use_backend(args.backend) if args.backend else contextlib.nullcontext()
    print(
        f"x {args.batch}x{args.in_features} @ W {args.out_features}x{args.in_features}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"{'dtype':<10} {'layer':<18} {'ms':>9} {'ratio':>7}")
    with torch.no_grad(), preference:
        for dtype_name in args.dtype or ["float32", "bfloat16"]:
            dtype = getattr(torch, dtype_name)
            x = torch.randn(args.batch, args.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
            dense = reference.to(dtype)
            repeats = {"min_repeats": args.repeats, "max_repeats": args.repeats}
            baseline = time_call(lambda d=dense, x=x: d(x), **repeats).best
            print(f"{dtype_name:<10} {'nn.Linear':<18} {baseline * 1e3:>9.2f} {1.0:>7.2f}")
            for label, layer in variants.items():
                seconds = time_call(lambda m=layer, x=x: m(x), **repeats).best
                print(f"{dtype_name:<10} {label:<18} {seconds * 1e3:>9.2f} {seconds / baseline:>7.2f}")


if __name__ == "__main__":
    main()
