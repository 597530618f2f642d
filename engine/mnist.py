"""MNIST-5k: 5,000 real handwritten digits shipped with the project (``engine/assets``), the
``mnist`` data kind and the task of ``make demo``.

The splits are fixed by ``data.seed``: each class's images are shuffled, then the classes are
interleaved, so any leading or trailing run of the order is balanced to within one image per
class. The test split is the tail of that order and train, then val, its head: changing the
train or val size never moves an image into or out of the test split.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

MNIST_FILE = Path(__file__).resolve().parent / "assets" / "mnist_5k.csv.gz"
MNIST_SIZE = 28  # native resolution
MNIST_CLASSES = 10
MNIST_IMAGES = 5000


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [5000, 28, 28], int64 labels [5000]), read once per process."""
    with gzip.open(MNIST_FILE, "rt") as fh:
        rows = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    images = rows[:, :-1].reshape(-1, MNIST_SIZE, MNIST_SIZE).astype(np.uint8)
    labels = rows[:, -1]
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller
    return images, labels


def split_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of the image indices: per-class shuffles, interleaved class by class."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(int(labels.max()) + 1)]
    depth = max(len(p) for p in per_class)
    grid = np.full((depth, len(per_class)), -1)
    for c, p in enumerate(per_class):
        grid[: len(p), c] = p
    return grid[grid >= 0]  # row-major: one image of each class, then the next of each, ...


def mnist_split(split: str, sizes: dict[str, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [n, 28, 28], int64 labels [n]) of ``split`` (train, val or test) for ``sizes``."""
    total = sizes["train"] + sizes["val"] + sizes["test"]
    if total > MNIST_IMAGES:
        raise ValueError(f"train + val + test = {total:,} images, but MNIST-5k has {MNIST_IMAGES:,}")
    images, labels = load_mnist5k()
    order = split_order(labels, seed)
    ranges = {"train": order[: sizes["train"]],
              "val": order[sizes["train"]: sizes["train"] + sizes["val"]],
              "test": order[len(order) - sizes["test"]:]}
    index = ranges[split]
    return images[index], labels[index]
