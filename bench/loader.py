"""Data loading with and without ``data.cache``: ``python -m bench.loader [--images N] [--workers W ...]``.

The papers' protocol has no augmentation, so every epoch decodes and resizes the same JPEGs to the
same tensors. ``CachedImageDataset`` does that once; an epoch then only converts and normalises.
This times one epoch of a DataLoader over the same JPEG files (VTAB-1k-like: 500x375, quality 90,
resized to 224) both ways, interleaved epoch by epoch, and reports images per second and their
ratio, for each worker count. The one-off cost of filling the cache is reported beside it.
A GPU step of ViT-B/16 at batch 64 takes 23.5 ms on an H200 (bench/cuda: 2,720 images/s), so a
loader slower than that leaves the GPU waiting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.datasets import CachedImageDataset, ImageListDataset, build_transform
from engine.demo_data import make_demo_arrays

from .run import ROOT, machine_info

DEFAULT_OUT = ROOT / "runs" / "bench" / "results-loader.json"


def write_jpegs(folder: Path, n: int) -> list[tuple[str, int]]:
    """n textured 500x375 JPEGs (the demo generator's images, enlarged), labels 0-3."""
    images, labels = make_demo_arrays(0, "train", n, 4)
    samples = []
    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(image).resize((500, 375), Image.BICUBIC).save(path, quality=90)
        samples.append((str(path), int(label)))
    return samples


def epoch_seconds(ds, workers: int, batch: int = 64) -> float:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per contender and worker count")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_jpegs(Path(tmp), args.images)
        plain = ImageListDataset(samples, build_transform(args.size))
        start = time.perf_counter()
        cached = CachedImageDataset(samples, args.size)
        fill_s = time.perf_counter() - start
        rows = []
        for workers in args.workers:
            times = {"decode every epoch": [], "cached": []}
            for _ in range(args.epochs):  # interleaved, so drift in the machine hits both alike
                times["decode every epoch"].append(epoch_seconds(plain, workers))
                times["cached"].append(epoch_seconds(cached, workers))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"workers": workers, **{f"{k} images/s": args.images / v for k, v in med.items()},
                         "speedup": med["decode every epoch"] / med["cached"], "epoch_s": times})
            print(f"workers {workers}: decode every epoch {args.images / med['decode every epoch']:,.0f} images/s, "
                  f"cached {args.images / med['cached']:,.0f} images/s, {rows[-1]['speedup']:.1f}x", flush=True)
    print(f"filling the cache: {fill_s:.2f} s for {args.images} images "
          f"({cached.images.numel() / 2**20:.0f} MiB of uint8)")
    result = {"images": args.images, "size": args.size, "cache_fill_s": fill_s, "rows": rows, "machine": machine_info()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
