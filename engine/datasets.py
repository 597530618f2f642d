"""The image side of the data: :class:`DataError`, the transforms of the papers' protocol, image
decoding and checking, and the Dataset classes (decoded at every access, decoded once and kept, or
held in memory as tensors) that ``engine.data`` builds its splits from.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import v2

__all__ = [
    "DataError",
    "build_transform",
    "ImageListDataset",
    "CachedImageDataset",
    "TensorImageDataset",
    "check_images",
]

Sample = tuple[str, int]
Norm = tuple[Sequence[float], Sequence[float]]  # (mean, std)


class DataError(ValueError):
    """A dataset is missing, malformed or unreadable; the message names the file."""


# --------------------------------------------------------------------------- transforms


def _to_rgb(img: Image.Image) -> Image.Image:
    # Module-level (not a lambda) so the transform pickles into DataLoader workers.
    return _as_rgb(img)


def build_transform(
    img_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> transforms.Compose:
    """The VTAB-1k protocol of the GLoRA/NOAH papers: no augmentation, a plain bicubic
    resize to a square, ToTensor, ImageNet normalisation. Accepts PIL images of any mode."""
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize((img_size, img_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _build_tensor_transform(
    img_size: int,
    src_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """Tensor counterpart of :func:`build_transform` for uint8 [3,H,W] tensors (demo task)."""
    steps: list[Callable] = []
    if img_size != src_size:
        # uint8 in, uint8 out: bicubic over/undershoot is clamped just as PIL does.
        steps.append(v2.Resize((img_size, img_size), interpolation=v2.InterpolationMode.BICUBIC,
                               antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


# --------------------------------------------------------------------------- datasets


class ListedPath(str):
    """An image path that remembers the list file and line that named it, for error messages."""

    origin: str = ""

    def __new__(cls, path: str, origin: str):
        self = super().__new__(cls, path)
        self.origin = origin
        return self

    def __reduce__(self):  # DataLoader workers receive it pickled
        return ListedPath, (str(self), self.origin)


def _where(path: str) -> str:
    origin = getattr(path, "origin", "")
    return f"{origin}: {path}" if origin else str(path)


def _decode_error(path: str, exc: BaseException) -> DataError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return DataError(f"{_where(path)}: cannot decode image ({type(exc).__name__}: {reason})")


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _as_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode. 16- and 32-bit integer images ('I;16' PNGs, 'I') are scaled to 8 bits by
    their 16-bit range: PIL's own convert clips every value above 255 to white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.int64)
        img = Image.fromarray(((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode == "F":  # float images: taken as 0..1
        img = Image.fromarray((np.clip(np.asarray(img), 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            # _as_rgb forces the full decode inside the try, so truncated files fail here
            # and not later inside the transform.
            img.load()
            return _as_rgb(img)
    except _DECODE_ERRORS as exc:
        raise _decode_error(path, exc) from None


def _check_image(path: str) -> None:
    """Read every byte of an image's data without keeping it: JPEGs decoded at 1/8 scale (libjpeg
    still reads the whole entropy-coded stream, so truncation is found), everything else decoded."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except _DECODE_ERRORS as exc:
        raise _decode_error(path, exc) from None


def check_images(samples: Sequence[Sample], threads: int | None = None) -> None:
    """Raise the first decoding problem of ``samples`` (in sample order) before any training: a split
    decoded at every access would otherwise fail at the first epoch that reaches the broken file."""
    paths = [p for p, _ in samples]
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        for _ in pool.map(_check_image, paths):
            pass


class ImageListDataset(Dataset):
    """(image path, label) pairs decoded lazily with PIL."""

    def __init__(self, samples: Sequence[Sample], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(_load_image(path)), label


class TensorImageDataset(Dataset):
    """In-memory uint8 images [N,3,H,W] with int64 labels; normalised on access so that a
    large ``img_size`` never materialises the whole float dataset at once."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"TensorImageDataset: expected uint8 [N,3,H,W] images, got "
                            f"{images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"TensorImageDataset: expected {images.shape[0]} labels, got "
                            f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class CachedImageDataset(ImageListDataset):
    """(image path, label) pairs decoded and resized once, up front and on several threads, then kept
    as uint8; each access only converts to float and normalises. The tensors are bit for bit those
    of ``ImageListDataset(samples, build_transform(...))``: no augmentation happens in between
    (the papers' protocol), so decoding every epoch would redo the same work. A file that cannot be
    decoded fails here, before any training."""

    def __init__(self, samples: Sequence[Sample], img_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, threads: int | None = None) -> None:
        super().__init__(samples, transforms.Normalize(mean, std))  # the transform left for each access
        self.images = torch.empty((len(self.samples), 3, img_size, img_size), dtype=torch.uint8)
        resize = transforms.Resize((img_size, img_size), interpolation=transforms.InterpolationMode.BICUBIC)

        def load(index: int) -> None:
            pixels = np.array(resize(_load_image(self.samples[index][0])), dtype=np.uint8)  # writable, for torch
            self.images[index] = torch.from_numpy(pixels).permute(2, 0, 1)

        # PIL releases the GIL while it decodes and resamples, so threads scale.
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(load, range(len(self.samples))))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # as ToTensor does for uint8 images: float, then divide by 255
        return self.transform(self.images[index].float().div(255)), self.samples[index][1]
