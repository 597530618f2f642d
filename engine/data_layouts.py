"""The on-disk dataset layouts: VTAB-1k and few-shot list files (``<image path> <label>`` lines)
and ``imagefolder`` trees (``<split>/<class>/<image>``), read into checked (path, label) samples.
"""

from __future__ import annotations

import os
from typing import Sequence

from torchvision.datasets.folder import find_classes, make_dataset

from .config import DataConfig
from .datasets import DataError, ListedPath, Sample

__all__ = ["IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
)


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
