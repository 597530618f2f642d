"""The embedded tasks, held in memory and needing no ``data.root``: the generated ``demo`` task
(:func:`make_demo_arrays`) and ``mnist`` (MNIST-5k, ``engine.mnist``), built into tensor datasets.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import DataConfig
from .datasets import DataError, Norm, TensorImageDataset, _build_tensor_transform
from .mnist import MNIST_CLASSES, MNIST_SIZE, mnist_split

__all__ = ["make_demo_arrays", "DEMO_SIZE"]

DEMO_SIZE = 32  # native resolution of the generated demo images


# Two objects on a noisy, textured background: a warm-coloured filled square (the anchor A)
# and a cool-coloured filled disk (B). The class is the spatial relation of B to A along
# the dominant axis: 0 right-of, 1 above, 2 left-of, 3 below (the first demo_classes of
# these). Both objects are present in every image, with sizes, colours and background
# drawn independently of the label, so per-channel statistics, colour histograms and
# "is there a red thing" are uninformative; the label lives only in the relative position
# of two parts, which a frozen random backbone plus a linear probe cannot read out but a
# trained network learns quickly.
#
# Generation uses only integer draws and integer arithmetic so that the bytes are identical
# on every platform (no libm-dependent floats such as normal() tails or atan2).

_DEMO_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_DEMO_MIN_OBJ, _DEMO_MAX_OBJ = 5, 8  # object side / diameter in pixels (inclusive range)
_DEMO_MARGIN = 2  # dominant-axis offset must exceed the other by this many pixels


def _demo_relations(ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray,
                    sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """Relation label of B to A per candidate, or -1 where it is ambiguous/overlapping.
    Centres are kept doubled so everything stays integer."""
    dx = (2 * bx + sb) - (2 * ax + sa)
    dy = (2 * by + sb) - (2 * ay + sa)  # image y grows downwards
    gap = sa + sb + 2  # doubled: the objects are >= 1 px apart along the dominant axis
    horizontal = (np.abs(dx) >= np.abs(dy) + 2 * _DEMO_MARGIN) & (np.abs(dx) >= gap)
    vertical = (np.abs(dy) >= np.abs(dx) + 2 * _DEMO_MARGIN) & (np.abs(dy) >= gap)
    label = np.full(dx.shape, -1, dtype=np.int64)
    label[horizontal & (dx > 0)] = 0
    label[vertical & (dy < 0)] = 1
    label[horizontal & (dx < 0)] = 2
    label[vertical & (dy > 0)] = 3
    return label


def _demo_candidates(rng: np.random.Generator, m: int) -> np.ndarray:
    """m random geometries, rows of (ax, ay, sa, bx, by, sb), plus their relation label."""
    hi = DEMO_SIZE + 1
    sa, sb = (rng.integers(_DEMO_MIN_OBJ, _DEMO_MAX_OBJ + 1, m) for _ in range(2))
    ax, ay = rng.integers(0, hi - sa), rng.integers(0, hi - sa)
    bx, by = rng.integers(0, hi - sb), rng.integers(0, hi - sb)
    rel = _demo_relations(ax, ay, bx, by, sa, sb)
    return np.stack([rel, ax, ay, sa, bx, by, sb], axis=1)


def _demo_layout(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """Balanced labels and object geometry: rows of (label, ax, ay, sa, bx, by, sb)."""
    labels = rng.permutation(np.arange(n) % num_classes)
    rows = np.zeros((n, 7), dtype=np.int64)
    for cls in range(num_classes):
        idx = np.flatnonzero(labels == cls)
        pool = np.zeros((0, 7), dtype=np.int64)
        while len(pool) < idx.size:  # rejection sampling; ~1/8 of candidates fit a class
            cand = _demo_candidates(rng, 8 * idx.size + 8)
            pool = np.concatenate([pool, cand[cand[:, 0] == cls]])
        rows[idx] = pool[: idx.size]
    return rows


def _demo_backgrounds(rng: np.random.Generator, n: int) -> np.ndarray:
    """Textured, noisy backgrounds, int16 [n, H, W, 3]: random base colour, two blocky
    low-frequency layers at different scales and per-pixel noise."""
    size = DEMO_SIZE
    base = rng.integers(70, 186, (n, 1, 1, 3))
    coarse = rng.integers(-30, 31, (n, size // 8, size // 8, 3)).repeat(8, 1).repeat(8, 2)
    fine = rng.integers(-15, 16, (n, size // 4, size // 4, 3)).repeat(4, 1).repeat(4, 2)
    noise = rng.integers(-20, 21, (n, size, size, 3))
    return (base + coarse + fine + noise).astype(np.int16)


def _demo_colours(rng: np.random.Generator, n: int, warm: bool) -> np.ndarray:
    """Saturated colours: warm = red/orange/yellow-ish, cool = blue/cyan/violet-ish."""
    strong = rng.integers(200, 256, n)
    mid = rng.integers(0, 160, n)
    weak = rng.integers(0, 50, n)
    # warm: (R, G, B) = (strong, mid, weak); cool: (weak, mid, strong)
    cols = np.stack([strong, mid, weak] if warm else [weak, mid, strong], axis=1)
    return cols.astype(np.int16)


def make_demo_arrays(seed: int, split: str, n: int, num_classes: int = 4
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic demo split: (uint8 images [n, 32, 32, 3], int64 labels [n])."""
    if split not in _DEMO_SPLIT_IDS:
        raise DataError(f"demo: unknown split {split!r} (expected train, val or test)")
    if not 2 <= num_classes <= 4:
        raise DataError(f"demo: demo_classes must be 2..4 (spatial relations), got {num_classes}")
    if n <= 0:
        raise DataError(f"demo: {split} split size must be positive, got {n}")
    # Each split gets its own stream, so changing one split's size leaves the others unchanged.
    rng = np.random.default_rng([seed, _DEMO_SPLIT_IDS[split]])
    layout = _demo_layout(rng, n, num_classes)
    images = _demo_backgrounds(rng, n)
    warm, cool = _demo_colours(rng, n, warm=True), _demo_colours(rng, n, warm=False)
    yy, xx = np.mgrid[:_DEMO_MAX_OBJ, :_DEMO_MAX_OBJ]
    for i, (_, ax, ay, sa, bx, by, sb) in enumerate(layout):
        images[i, ay:ay + sa, ax:ax + sa] = warm[i]  # square
        # disk, integer test on doubled coordinates: (2x+1-s)^2 + (2y+1-s)^2 <= s^2
        disk = (2 * xx[:sb, :sb] + 1 - sb) ** 2 + (2 * yy[:sb, :sb] + 1 - sb) ** 2 <= sb * sb
        images[i, by:by + sb, bx:bx + sb][disk] = cool[i]
    return np.clip(images, 0, 255).astype(np.uint8), layout[:, 0].copy()


def _split_arrays(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8 images [n, H, W, 3] or [n, H, W], int64 labels [n], native size) of an embedded task's split."""
    sizes = {"train": cfg.demo_train, "val": cfg.demo_val, "test": cfg.demo_test}
    if cfg.kind == "mnist":
        try:
            images, labels = mnist_split(split, sizes, cfg.seed)
        except ValueError as err:
            raise DataError(f"data.demo_train/demo_val/demo_test: {err}") from None
        return images, labels, MNIST_SIZE
    return (*make_demo_arrays(cfg.seed, split, sizes[split], cfg.demo_classes), DEMO_SIZE)


def _embedded_dataset(cfg: DataConfig, splits: Sequence[str], img_size: int, norm: Norm) -> TensorImageDataset:
    arrays = [_split_arrays(cfg, s) for s in splits]
    images = torch.from_numpy(np.concatenate([a for a, _, _ in arrays]))
    # grey images (MNIST) are repeated to three channels, as a PIL convert("RGB") would
    images = images.unsqueeze(-1).expand(*images.shape, 3) if images.ndim == 3 else images
    labels = torch.from_numpy(np.concatenate([y for _, y, _ in arrays]))
    return TensorImageDataset(images.permute(0, 3, 1, 2).contiguous(), labels,
                              _build_tensor_transform(img_size, arrays[0][2], *norm))


def _build_embedded(cfg: DataConfig, phase: str, img_size: int, norm: Norm) -> tuple[Dataset, Dataset, int]:
    """The embedded tasks, held in memory: the generated ``demo`` and the real ``mnist`` (MNIST-5k)."""
    classes = MNIST_CLASSES if cfg.kind == "mnist" else cfg.demo_classes
    if cfg.num_classes is not None and classes > cfg.num_classes:
        raise DataError(f"{cfg.kind}: {classes} classes > num_classes {cfg.num_classes}")
    train_splits, eval_split = {"search": (("train",), "val"),
                                "final": (("train", "val"), "test")}[phase]
    num_classes = cfg.num_classes if cfg.num_classes is not None else classes
    return (_embedded_dataset(cfg, train_splits, img_size, norm), _embedded_dataset(cfg, (eval_split,), img_size, norm),
            num_classes)
