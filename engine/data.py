"""Datasets for GLoRA fine-tuning: VTAB-1k lists, few-shot lists, image folders and the embedded
``demo`` and ``mnist`` tasks. This module holds the entry points (:func:`build_splits`, the
evaluation folders of ``evaluate``); the layouts on disk are read in ``engine.data_layouts``, the
embedded tasks built in ``engine.demo_data`` and the Dataset classes live in ``engine.datasets``.

Everything that can be checked cheaply (directories, list syntax, labels, image file
existence) is checked eagerly when a split is built, so a broken dataset fails before a
long supernet run starts rather than hours into it. Every image is also decoded once when
the split is built (kept, with ``data.cache``, else only checked: :func:`check_images`), so
a corrupt or truncated file fails there too, named with its list line. All
problems surface as :class:`DataError` with a one-line message naming the offending file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.datasets.folder import find_classes

from .config import DataConfig
from .data_layouts import (_folder_class_to_idx, _folder_samples, _folder_split_samples, _list_layout, _list_samples,
                           _read_lines, _read_list, _require_dir, _require_root)
from .datasets import (CachedImageDataset, DataError, ImageListDataset, Norm, Sample, build_transform,
                       check_images)
from .demo_data import _build_embedded

__all__ = [
    "DataError",
    "DataConfig",
    "build_splits",
    "build_folder_eval",
    "load_class_names",
    "run_class_names",
    "FolderEval",
    "image_dataset",
]

PHASES = ("search", "final")
CACHE_MODES = ("auto", "always", "never")
CACHE_AUTO_BYTES = 4 << 30  # cache: auto keeps a split decoded when it takes at most this much memory
EMBEDDED = ("demo", "mnist")  # tasks held in memory, needing no data.root
KINDS = ("vtab1k", "fewshot", "imagefolder", *EMBEDDED)


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
