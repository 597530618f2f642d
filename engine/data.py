"""Datasets for GLoRA fine-tuning: VTAB-1k lists, few-shot lists, image folders and an
embedded synthetic ``demo`` task.

Everything that can be checked cheaply (directories, list syntax, labels, image file
existence) is checked eagerly when a split is built, so a broken dataset fails before a
long supernet run starts rather than hours into it. Every image is also decoded once when
the split is built (kept, with ``data.cache``, else only checked: :func:`check_images`), so
a corrupt or truncated file fails there too, named with its list line. All
problems surface as :class:`DataError` with a one-line message naming the offending file.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import find_classes, make_dataset
from torchvision.transforms import v2

from .config import DataConfig
from .mnist import MNIST_CLASSES, MNIST_SIZE, mnist_split

__all__ = [
    "DataError",
    "DataConfig",
    "build_transform",
    "build_splits",
    "build_folder_eval",
    "load_class_names",
    "run_class_names",
    "FolderEval",
    "ImageListDataset",
    "CachedImageDataset",
    "image_dataset",
    "check_images",
    "TensorImageDataset",
    "make_demo_arrays",
    "IMAGE_EXTENSIONS",
    "DEMO_SIZE",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
)
PHASES = ("search", "final")
CACHE_MODES = ("auto", "always", "never")
CACHE_AUTO_BYTES = 4 << 30  # cache: auto keeps a split decoded when it takes at most this much memory
EMBEDDED = ("demo", "mnist")  # tasks held in memory, needing no data.root
KINDS = ("vtab1k", "fewshot", "imagefolder", *EMBEDDED)
DEMO_SIZE = 32  # native resolution of the generated demo images

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


# --------------------------------------------------------------------------- list files


def _parse_line(line: str, list_path: str, lineno: int) -> Sample:
    # Split on the LAST whitespace run so that image paths may contain spaces.
    parts = line.rsplit(maxsplit=1)
    if len(parts) != 2:
        raise DataError(f"{list_path}: line {lineno}: expected '<image path> <label>', "
                        f"got {line!r}")
    rel_path, label_text = parts
    try:
        label = int(label_text)
    except ValueError:
        raise DataError(f"{list_path}: line {lineno}: label {label_text!r} is not an integer "
                        f"in {line!r}") from None
    if label < 0:
        raise DataError(f"{list_path}: line {lineno}: negative label {label} in {line!r}")
    return rel_path, label


def _read_lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: {what} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read {what} ({err.strerror or err})") from None


def _read_list(list_path: str) -> list[tuple[int, str, int]]:
    """Parse a list file into (line number, relative path, label); blank lines skipped."""
    if not os.path.isfile(list_path):
        raise DataError(f"{list_path}: list file not found")
    entries = []
    for lineno, raw in enumerate(_read_lines(list_path, "list file"), start=1):
        line = raw.strip()
        if line:
            entries.append((lineno, *_parse_line(line, list_path, lineno)))
    if not entries:
        raise DataError(f"{list_path}: list file is empty (expected '<image path> <label>' lines)")
    return entries


def _load_list_split(list_path: str, image_root: str, num_classes: int | None) -> list[Sample]:
    samples = []
    for lineno, rel_path, label in _read_list(list_path):
        if num_classes is not None and label >= num_classes:
            raise DataError(f"{list_path}: line {lineno}: label {label} >= num_classes "
                            f"{num_classes}")
        path = os.path.join(image_root, rel_path)
        if not os.path.isfile(path):
            raise DataError(f"{list_path}: line {lineno}: image not found: {path}")
        samples.append((ListedPath(path, f"{list_path}: line {lineno}"), label))
    return samples


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{path}: {what} directory not found")


def _require_root(cfg: DataConfig) -> str:
    if not cfg.root:
        raise DataError(f"data.root: required for kind {cfg.kind!r}")
    _require_dir(cfg.root, "dataset root")
    return cfg.root


def _build_from_lists(
    list_dir: str,
    image_root: str,
    train_name: str,
    eval_name: str,
    all_names: Sequence[str],
    num_classes: int | None,
) -> tuple[list[Sample], list[Sample], int]:
    train = _load_list_split(os.path.join(list_dir, train_name), image_root, num_classes)
    evals = _load_list_split(os.path.join(list_dir, eval_name), image_root, num_classes)
    if num_classes is None:
        # Infer from every split on disk, not just the two loaded, so that the search and
        # final phases agree on the head size even if a class is absent from one split.
        labels = [label for _, label in train + evals]
        for name in all_names:
            path = os.path.join(list_dir, name)
            if name not in (train_name, eval_name) and os.path.isfile(path):
                labels += [label for _, _, label in _read_list(path)]
        num_classes = max(labels) + 1
    return train, evals, num_classes


def _list_layout(cfg: DataConfig) -> tuple[str, str, dict[str, tuple[str, str]], tuple[str, ...]]:
    """Where a list layout keeps its lists and images: (list dir, image root, the (train, eval)
    list of each phase, every list name)."""
    root = _require_root(cfg)
    if cfg.kind == "vtab1k":
        if not cfg.task:
            raise DataError("data.task: required for kind 'vtab1k'")
        task_dir = os.path.join(root, cfg.task)
        _require_dir(task_dir, "vtab1k task")
        return (task_dir, task_dir,
                {"search": ("train800.txt", "val200.txt"), "final": ("train800val200.txt", "test.txt")},
                ("train800.txt", "val200.txt", "train800val200.txt", "test.txt"))
    if not cfg.dataset:
        raise DataError("data.dataset: required for kind 'fewshot'")
    ds_dir = os.path.join(root, cfg.dataset)
    _require_dir(ds_dir, "few-shot dataset")
    ann_dir = os.path.join(ds_dir, "annotations")
    _require_dir(ann_dir, "few-shot annotations")
    train_name = f"train_meta.list.num_shot_{cfg.shots}.seed_{cfg.seed}"
    return (ann_dir, os.path.join(ds_dir, "images"),
            {"search": (train_name, "val_meta.list"), "final": (train_name, "test_meta.list")},
            (train_name, "val_meta.list", "test_meta.list"))


def _list_samples(cfg: DataConfig, phase: str) -> tuple[list[Sample], list[Sample], int]:
    list_dir, image_root, phases, all_names = _list_layout(cfg)
    return _build_from_lists(list_dir, image_root, *phases[phase], all_names, cfg.num_classes)


# --------------------------------------------------------------------------- image folders


def _folder_samples(split_dir: str, class_to_idx: dict[str, int]) -> list[Sample]:
    samples = make_dataset(split_dir, class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataError(f"{split_dir}: no images (expected <class>/<image> with extension in "
                        f"{' '.join(IMAGE_EXTENSIONS)})")
    found = {label for _, label in samples}
    for name, label in sorted(class_to_idx.items()):  # a folder that is there but empty: a copy gone wrong
        if label not in found and os.path.isdir(os.path.join(split_dir, name)):
            raise DataError(f"{os.path.join(split_dir, name)}: empty class folder (no image with extension in "
                            f"{' '.join(IMAGE_EXTENSIONS)}); add its images or remove it")
    return samples


def _folder_class_to_idx(root: str) -> dict[str, int]:
    # One class list for all splits present: a class missing from one split must not shift
    # the label indices of that split relative to the others.
    classes: set[str] = set()
    for split in ("train", "val", "test"):
        try:
            classes.update(find_classes(os.path.join(root, split))[0])
        except FileNotFoundError:
            pass  # an absent or empty split; reported by the builder if it is actually used
    return {name: i for i, name in enumerate(sorted(classes))}


def _folder_split_samples(cfg: DataConfig, phase: str) -> tuple[list[Sample], list[Sample], int]:
    root = _require_root(cfg)
    required = {"search": ("train", "val"), "final": ("train", "test")}[phase]
    for split in required:
        _require_dir(os.path.join(root, split), f"imagefolder '{split}' split")
    present = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
    class_to_idx = _folder_class_to_idx(root)
    if cfg.num_classes is not None and len(class_to_idx) > cfg.num_classes:
        raise DataError(f"{root}: {len(class_to_idx)} class folders but num_classes is "
                        f"{cfg.num_classes}")

    def load(split: str) -> list[Sample]:
        return _folder_samples(os.path.join(root, split), class_to_idx)

    if phase == "search":
        train, evals = load("train"), load("val")
    else:
        train = load("train") + (load("val") if "val" in present else [])
        evals = load("test")
    num_classes = cfg.num_classes if cfg.num_classes is not None else len(class_to_idx)
    return train, evals, num_classes


# --------------------------------------------------------------------------- demo task
#
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


# --------------------------------------------------------------------------- evaluation folders
#
# Out-of-domain test sets (ImageNet-V2, -Sketch, -A, -R for a model tuned on ImageNet) come as
# plain <class>/<image> folders, often holding only some of the model's classes. Their class
# folders are mapped to the model's outputs by name (the run's own class names, or a file) or,
# where every folder is a number (ImageNet-V2), by index.


def load_class_names(path: str) -> dict[str, int]:
    """A class-name file: line i names output i by its first field, so an ImageNet
    ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca``) works as it is."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: class-name file not found")
    lines = _read_lines(path, "class-name file")
    while lines and not lines[-1].strip():
        lines.pop()
    names: dict[str, int] = {}
    for i, line in enumerate(lines):
        fields = line.split()
        if not fields:
            raise DataError(f"{path}: line {i + 1}: empty (expected one class name per line, "
                            f"line i naming output i)")
        if fields[0] in names:
            raise DataError(f"{path}: line {i + 1}: class {fields[0]!r} already named on line "
                            f"{names[fields[0]] + 1}")
        names[fields[0]] = i
    if not names:
        raise DataError(f"{path}: no class names (expected one per line, line i naming output i)")
    return names


def run_class_names(cfg: DataConfig) -> dict[str, int] | None:
    """The names the run's own data gives its labels, or None where it gives none.

    imagefolder: its class folders. List layouts: the folder each listed image sits in, where
    every label has exactly one such folder and no two labels share one (few-shot ImageNet
    lists, ``n01440764/n01440764_10026.JPEG 0``); VTAB-1k's ``images/<split>/`` do not."""
    if cfg.kind == "imagefolder":
        return _folder_class_to_idx(_require_root(cfg)) or None
    if cfg.kind not in ("vtab1k", "fewshot"):
        return None
    list_dir, _, _, all_names = _list_layout(cfg)
    folders: dict[int, set[str]] = {}
    for name in all_names:
        path = os.path.join(list_dir, name)
        if os.path.isfile(path):
            for _, rel_path, label in _read_list(path):
                parent = os.path.basename(os.path.dirname(rel_path.replace("\\", "/")))
                folders.setdefault(label, set()).add(parent)
    names: dict[str, int] = {}
    for label, found in folders.items():
        folder = found.pop() if len(found) == 1 else ""
        if not folder or folder in names:
            return None
        names[folder] = label
    return names or None


@dataclass
class FolderEval:
    dataset: ImageListDataset  # labels are output indices
    classes: list[int]  # the output index of each class folder, ascending
    mapped_by: str  # "name" or "index"


def build_folder_eval(folder: str, names: dict[str, int] | None, num_outputs: int, img_size: int,
                      mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                      names_missing: str | None = None) -> FolderEval:
    """A test-only ``<folder>/<class>/.../<image>`` set, labelled with the model's output indices:
    by class name where ``names`` has every folder, else by number where every folder is one.
    ``names_missing``: why there are no names, for the error if they were needed."""
    _require_dir(folder, "evaluation")
    try:
        found = find_classes(folder)[0]
    except FileNotFoundError:
        raise DataError(f"{folder}: no class folders (expected <class>/<image>)") from None
    if names is not None and all(c in names for c in found):
        mapping, mapped_by = {c: names[c] for c in found}, "name"
    elif all(c.isdigit() for c in found):
        mapping, mapped_by = {c: int(c) for c in found}, "index"
    else:
        unknown = [c for c in found if names is None or c not in names]
        shown = ", ".join(repr(c) for c in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        where = ("are not among the run's class names" if names is not None else
                 f"cannot be matched: the run's class names could not be read ({names_missing})" if names_missing else
                 "cannot be matched: the run's data names no classes")
        raise DataError(f"{folder}: class folders {shown} {where}; pass --classes FILE "
                        f"(line i naming output i), or name the folders by output index")
    beyond = sorted(c for c, i in mapping.items() if i >= num_outputs)
    if beyond:
        raise DataError(f"{folder}: class folder {beyond[0]!r} maps to output {mapping[beyond[0]]}, "
                        f"but the model has {num_outputs} outputs")
    samples = _folder_samples(folder, mapping)
    check_images(samples)
    return FolderEval(ImageListDataset(samples, build_transform(img_size, mean, std)),
                      sorted(set(mapping.values())), mapped_by)


# --------------------------------------------------------------------------- entry point

_SAMPLES = {"vtab1k": _list_samples, "fewshot": _list_samples, "imagefolder": _folder_split_samples}


def image_dataset(samples: Sequence[Sample], img_size: int, norm: Norm = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                  cache: str = "never") -> Dataset:
    """(path, label) samples as a dataset: decoded once and kept (:class:`CachedImageDataset`) when
    ``cache`` is always, or auto and they fit in CACHE_AUTO_BYTES; else decoded at every access."""
    if cache == "always" or (cache == "auto" and len(samples) * 3 * img_size * img_size <= CACHE_AUTO_BYTES):
        return CachedImageDataset(samples, img_size, *norm)
    check_images(samples)
    return ImageListDataset(samples, build_transform(img_size, *norm))


def build_splits(cfg: DataConfig, phase: str, img_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, cache: Sequence[str] = ("train", "eval"),
                 ) -> tuple[Dataset, Dataset, int]:
    """(train_dataset, eval_dataset, num_classes) for a phase, images resized to ``img_size`` and
    normalised with ``mean``/``std``.

    search: the held-out split is the validation split (used by the evolutionary search);
    final:  train on train+val and evaluate on test (the retraining phase).
    cache: which of the two may be kept decoded in memory (as ``cfg.cache`` allows): the ones the
    caller reads many times, so that a split used once is not decoded ahead for nothing.
    """
    if phase not in PHASES:
        raise DataError(f"phase {phase!r}: expected one of {', '.join(PHASES)}")
    if cfg.kind not in KINDS:
        raise DataError(f"data.kind {cfg.kind!r}: expected one of {', '.join(KINDS)}")
    if cfg.num_classes is not None and cfg.num_classes <= 0:
        raise DataError(f"data.num_classes must be positive, got {cfg.num_classes}")
    if cfg.cache not in CACHE_MODES:
        raise DataError(f"data.cache {cfg.cache!r}: expected one of {', '.join(CACHE_MODES)}")
    norm = (tuple(mean), tuple(std))
    if cfg.kind in EMBEDDED:  # in memory already
        return _build_embedded(cfg, phase, img_size, norm)
    train, evals, num_classes = _SAMPLES[cfg.kind](cfg, phase)
    return (image_dataset(train, img_size, norm, cfg.cache if "train" in cache else "never"),
            image_dataset(evals, img_size, norm, cfg.cache if "eval" in cache else "never"), num_classes)
