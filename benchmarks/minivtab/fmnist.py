"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files, gzip)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FMNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MISSING_MESSAGE = (f"Fashion-MNIST not found under {FMNIST_DIR}: install it with "
                   f"`apt-get install dataset-fashion-mnist` (or set FASHION_MNIST_DIR)")


class FashionMNISTMissing(RuntimeError):
    pass


def files(split: str) -> list[Path]:
    return [FMNIST_DIR / name for name in FILES[split]]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 28, 28], int64 labels [N]) of the 'train' (60k) or 'test' (10k) split."""
    img_path, lab_path = files(split)
    if not img_path.is_file() or not lab_path.is_file():
        raise FashionMNISTMissing(MISSING_MESSAGE)
    return _read_idx(img_path), _read_idx(lab_path).astype(np.int64)
