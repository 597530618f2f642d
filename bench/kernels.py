"""Elementwise kernels a vector/scalar GLoRA layer runs over its activations, timed on one device:
``python -m bench.kernels [--device cuda] [--tokens N]``.

Each layer with a vector A and B adds ``z ⊙ s + b`` and ``xsum ⊗ t`` to the output of its
frozen product. This times the ways of writing these two passes (same-dtype broadcast,
mixed-dtype broadcast, the rank-1 update as a matrix product) on vit_base's layer widths,
against one plain copy of the same tensor as the memory-bound reference.
"""

from __future__ import annotations

import argparse
import time

import torch


def _time(fn, device: str, reps: int) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps * 1e3
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tokens", type=int, default=64 * 197, help="rows N (default: batch 64 of 197 tokens)")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    dev, dt = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    print(f"{'width':>6} {'variant':34} {'us':>8}")
    for width in (768, 2304, 3072):
        z = torch.randn(args.tokens, width, device=dev, dtype=dt)
        xsum = torch.randn(args.tokens, 1, device=dev, dtype=dt)
        s32, b32, t32 = (torch.randn(width, device=dev) for _ in range(3))
        s, b, t = s32.to(dt), b32.to(dt), t32.to(dt)
        y = torch.empty_like(z)
        variants = {
            "copy (memory-bound reference)": lambda: y.copy_(z),
            "addcmul(b, z, s), same dtype": lambda: torch.addcmul(b, z, s),
            "addcmul(b, z, s), fp32 vectors": lambda: torch.addcmul(b32, z, s32, out=y),
            "y.addcmul_(xsum, t), same dtype": lambda: y.addcmul_(xsum, t),
            "y.addcmul_(xsum, t), fp32 t": lambda: y.addcmul_(xsum, t32),
            "y.addmm_(xsum, t[None]) (rank 1)": lambda: y.addmm_(xsum, t[None]),
        }
        for name, fn in variants.items():
            print(f"{width:>6} {name:34} {_time(fn, dev, args.reps):8.1f}", flush=True)


if __name__ == "__main__":
    main()
