"""Tests for the data modules (engine/data.py, data_layouts.py, demo_data.py, datasets.py): the three on-disk
layouts, every DataError path and the demo task."""

from __future__ import annotations

import io
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import DataConfig, DataError, build_splits
from engine.datasets import build_transform
from engine.demo_data import make_demo_arrays

IMG = 32  # img_size used throughout

# (relative image path, label) per split; test holds the largest label (4) so that
# inference over *all* splits gives 5 classes even in the search phase.
VTAB_SPLITS = {
    "train800": [("images/train800/000000.png", 0), ("images/train800/000001.jpg", 1),
                 ("images/train800/000002.png", 2), ("images/train800/000003.png", 1)],
    "val200": [("images/val200/000000.png", 2), ("images/val200/000001.png", 0)],
    "test": [("images/test/000000.png", 4), ("images/test/000001.jpg", 3),
             ("images/test/000002.png", 0)],
}
VTAB_SPLITS["train800val200"] = VTAB_SPLITS["train800"] + VTAB_SPLITS["val200"]

FEWSHOT_TRAIN = "train_meta.list.num_shot_2.seed_1"
FEWSHOT_SPLITS = {
    FEWSHOT_TRAIN: [("class a/img 1.png", 0), ("class a/img 2.png", 0),
                    ("class_b/x.jpg", 1), ("class_b/y.png", 1)],
    "val_meta.list": [("class a/img 3.png", 0), ("class_b/z.png", 1)],
    "test_meta.list": [("class a/img 4.png", 0), ("class_b/w.png", 1), ("class_c/v.png", 2)],
}

# imagefolder: 'bird' only exists in test, so it must still shift cat/dog to 1/2 in train.
FOLDER_FILES = {
    "train": ["cat/a.png", "cat/b.JPG", "dog/c.png", "dog/notes.txt"],
    "val": ["cat/d.png", "dog/e.jpeg"],
    "test": ["bird/f.png", "cat/g.png", "dog/h.bmp"],
}


def write_image(path: Path, mode: str = "RGB", size: int = 12, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    img = img.convert(mode) if mode != "P" else img.quantize(16)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}.get(path.suffix.lower(), "PNG")
    img.save(path, format=fmt)
    return path


def write_list(path: Path, entries: list[tuple[str, int]], blank_lines: bool = False) -> Path:
    lines = [f"{p} {label}" for p, label in entries]
    if blank_lines:  # blank lines anywhere must be ignored
        lines = ["", *lines[:1], "   ", *lines[1:], ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def vtab(tmp_path: Path) -> DataConfig:
    task_dir = tmp_path / "vtab" / "dtd"
    for i, (split, entries) in enumerate(VTAB_SPLITS.items()):
        for j, (rel, _) in enumerate(entries):
            write_image(task_dir / rel, size=8 + 4 * ((i + j) % 7), seed=j)
        write_list(task_dir / f"{split}.txt", entries, blank_lines=split == "val200")
    return DataConfig(kind="vtab1k", root=str(tmp_path / "vtab"), task="dtd")


@pytest.fixture
def fewshot(tmp_path: Path) -> DataConfig:
    ds_dir = tmp_path / "fs" / "food"
    for name, entries in FEWSHOT_SPLITS.items():
        for rel, _ in entries:
            write_image(ds_dir / "images" / rel)
        write_list(ds_dir / "annotations" / name, entries)
    return DataConfig(kind="fewshot", root=str(tmp_path / "fs"), dataset="food", shots=2, seed=1)


@pytest.fixture
def folder(tmp_path: Path) -> DataConfig:
    root = tmp_path / "folder"
    for split, files in FOLDER_FILES.items():
        for rel in files:
            if rel.endswith(".txt"):
                (root / split / rel).write_text("not an image, must be ignored")
            else:
                write_image(root / split / rel, size=16)
    return DataConfig(kind="imagefolder", root=str(root))


def labels_of(ds) -> list[int]:
    return [ds[i][1] for i in range(len(ds))]


def assert_items_ok(ds) -> None:
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, IMG, IMG) and x.dtype == torch.float32
        assert isinstance(y, int)


@contextmanager
def raises_data_error(*needles: str) -> Iterator[pytest.ExceptionInfo]:
    """Expect a DataError whose one-line message contains every needle."""
    with pytest.raises(DataError) as info:
        yield info
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


# --------------------------------------------------------------------------- layouts load


@pytest.mark.parametrize("phase,train_split,eval_split", [
    ("search", "train800", "val200"),
    ("final", "train800val200", "test"),
])
def test_vtab_loads(vtab, phase, train_split, eval_split):
    train, evals, k = build_splits(vtab, phase, IMG)
    assert k == 5  # inferred from all four lists, test included
    assert labels_of(train) == [label for _, label in VTAB_SPLITS[train_split]]
    assert labels_of(evals) == [label for _, label in VTAB_SPLITS[eval_split]]
    assert_items_ok(train)
    assert_items_ok(evals)


@pytest.mark.parametrize("phase,eval_list", [("search", "val_meta.list"), ("final", "test_meta.list")])
def test_fewshot_loads(fewshot, phase, eval_list):
    train, evals, k = build_splits(fewshot, phase, IMG)
    assert k == 3
    assert labels_of(train) == [label for _, label in FEWSHOT_SPLITS[FEWSHOT_TRAIN]]
    assert labels_of(evals) == [label for _, label in FEWSHOT_SPLITS[eval_list]]
    assert any(" " in Path(p).name for p, _ in train.samples)  # paths with spaces survived
    assert_items_ok(train)
    assert_items_ok(evals)


@pytest.mark.parametrize("phase,train_labels,eval_labels", [
    ("search", [1, 1, 2], [1, 2]),            # classes: bird=0 (test only), cat=1, dog=2
    ("final", [1, 1, 2, 1, 2], [0, 1, 2]),    # train+val / test
])
def test_imagefolder_loads(folder, phase, train_labels, eval_labels):
    train, evals, k = build_splits(folder, phase, IMG)
    assert k == 3
    assert labels_of(train) == train_labels
    assert labels_of(evals) == eval_labels
    assert_items_ok(train)
    assert_items_ok(evals)


def test_imagefolder_final_without_val(folder):
    shutil.rmtree(Path(folder.root) / "val")
    train, _, _ = build_splits(folder, "final", IMG)
    assert len(train) == 3


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "1"])
def test_any_pil_mode_loads_as_rgb(vtab, mode):
    task_dir = Path(vtab.root) / vtab.task
    write_image(task_dir / "images/train800/000000.png" if mode != "CMYK"
                else task_dir / "images/train800/000001.jpg", mode=mode)
    train, _, _ = build_splits(vtab, "search", IMG)
    x, _ = train[0 if mode != "CMYK" else 1]
    assert x.shape == (3, IMG, IMG)


def test_build_transform_resizes_and_normalises():
    img = Image.new("L", (10, 7), color=128)
    x = build_transform(20)(img)
    assert x.shape == (3, 20, 20)
    # ImageNet normalisation: 128/255 maps to different values per channel
    assert torch.allclose(x[:, 0, 0], (128 / 255 - torch.tensor([0.485, 0.456, 0.406]))
                          / torch.tensor([0.229, 0.224, 0.225]), atol=1e-5)


# --------------------------------------------------------------------------- errors


def test_unknown_phase(vtab):
    with raises_data_error("'train'"):
        build_splits(vtab, "train", IMG)


@pytest.mark.parametrize("field,value", [("root", "no_such_root"), ("task", "no_such_task")])
def test_vtab_missing_dirs(vtab, field, value):
    path = str(Path(vtab.root).parent / value) if field == "root" else value
    setattr(vtab, field, path)
    with raises_data_error(value):
        build_splits(vtab, "search", IMG)


@pytest.mark.parametrize("phase,missing", [("search", "val200.txt"), ("final", "train800val200.txt")])
def test_vtab_missing_list(vtab, phase, missing):
    path = Path(vtab.root) / vtab.task / missing
    path.unlink()
    with raises_data_error(str(path)):
        build_splits(vtab, phase, IMG)


@pytest.mark.parametrize("bad_line", [
    "images/train800/000001.jpg",       # no label
    "images/train800/000001.jpg one",   # non-integer label
    "images/train800/000001.jpg 1.5",   # non-integer label
    "images/train800/000001.jpg -1",    # negative label
])
def test_vtab_bad_line(vtab, bad_line):
    path = Path(vtab.root) / vtab.task / "train800.txt"
    lines = path.read_text().splitlines()
    lines[2] = bad_line
    path.write_text("\n".join(lines) + "\n")
    with raises_data_error(str(path), "line 3", bad_line):
        build_splits(vtab, "search", IMG)


def test_blank_lines_do_not_shift_line_numbers(vtab):
    path = Path(vtab.root) / vtab.task / "val200.txt"  # written with blank lines 1 and 3
    path.write_text("\nimages/val200/000000.png 2\n\nimages/val200/000001.png x\n")
    with raises_data_error(str(path), "line 4"):
        build_splits(vtab, "search", IMG)


def test_label_checked_against_num_classes(vtab):
    vtab.num_classes = 4
    build_splits(vtab, "search", IMG)  # labels <= 2 in train800/val200: fine
    path = Path(vtab.root) / vtab.task / "test.txt"
    with raises_data_error(str(path), "line 1", "4"):
        build_splits(vtab, "final", IMG)


def test_given_num_classes_is_returned(vtab):
    vtab.num_classes = 10
    assert build_splits(vtab, "final", IMG)[2] == 10


def test_missing_image(vtab):
    rel = VTAB_SPLITS["val200"][1][0]
    (Path(vtab.root) / vtab.task / rel).unlink()
    list_path = Path(vtab.root) / vtab.task / "val200.txt"
    # val200.txt was written with blank lines: the 2nd entry is on line 4
    with raises_data_error(str(list_path), "line 4", rel):
        build_splits(vtab, "search", IMG)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_list(vtab, content):
    path = Path(vtab.root) / vtab.task / "val200.txt"
    path.write_text(content)
    with raises_data_error(str(path), "empty"):
        build_splits(vtab, "search", IMG)


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()[:-200]


@pytest.mark.parametrize("payload", [b"", b"definitely not an image", _truncated_png()],
                         ids=["zero-byte", "garbage", "truncated"])
def test_corrupt_image_raises_before_training(vtab, payload):
    rel = VTAB_SPLITS["train800"][2][0]
    path = Path(vtab.root) / vtab.task / rel
    path.write_bytes(payload)
    # Decoded every access (cache: never) or once up front (auto): either way the split is checked
    # when it is built, before any training, and the error names the list line too.
    for cache in ("never", "auto"):
        vtab.cache = cache
        with raises_data_error(str(path), "train800.txt: line 3"):
            build_splits(vtab, "search", IMG)
    with raises_data_error(str(path)):  # a split not cached is checked all the same
        build_splits(vtab, "search", IMG, cache=("eval",))


@pytest.mark.parametrize("make", ["vtab", "fewshot", "folder"])
def test_cached_splits_equal_uncached_bit_for_bit(make, request, monkeypatch):
    """data.cache keeps the resized uint8 pixels; float conversion and normalisation per access give
    exactly the tensors of decoding every time (images of several sizes and modes)."""
    from engine.datasets import CachedImageDataset

    cfg = request.getfixturevalue(make)
    for phase in ("search", "final"):
        cfg.cache = "never"
        plain = build_splits(cfg, phase, IMG, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
        cfg.cache = "always"
        cached = build_splits(cfg, phase, IMG, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
        for a, b in zip(plain[:2], cached[:2]):
            assert not isinstance(a, CachedImageDataset) and isinstance(b, CachedImageDataset)
            assert len(a) == len(b) and b.targets == a.targets
            for i in range(len(a)):
                assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    cfg.cache = "auto"
    assert isinstance(build_splits(cfg, "search", IMG)[0], CachedImageDataset)
    monkeypatch.setattr("engine.data.CACHE_AUTO_BYTES", 3 * IMG * IMG)  # room for one image: decode on access
    assert not isinstance(build_splits(cfg, "search", IMG)[0], CachedImageDataset)


def test_fewshot_missing_dataset(fewshot):
    fewshot.dataset = "no_such_dataset"
    with raises_data_error("no_such_dataset"):
        build_splits(fewshot, "search", IMG)


@pytest.mark.parametrize("change,expected_name", [
    ({"shots": 4}, "train_meta.list.num_shot_4.seed_1"),
    ({"seed": 7}, "train_meta.list.num_shot_2.seed_7"),
])
def test_fewshot_missing_train_list(fewshot, change, expected_name):
    for key, value in change.items():
        setattr(fewshot, key, value)
    expected = Path(fewshot.root) / fewshot.dataset / "annotations" / expected_name
    with raises_data_error(str(expected)):
        build_splits(fewshot, "final", IMG)


def test_fewshot_missing_image_names_list_and_line(fewshot):
    rel = FEWSHOT_SPLITS["test_meta.list"][2][0]
    (Path(fewshot.root) / fewshot.dataset / "images" / rel).unlink()
    list_path = Path(fewshot.root) / fewshot.dataset / "annotations" / "test_meta.list"
    with raises_data_error(str(list_path), "line 3", rel):
        build_splits(fewshot, "final", IMG)


@pytest.mark.parametrize("phase,removed", [
    ("search", "train"), ("search", "val"), ("final", "train"), ("final", "test"),
])
def test_imagefolder_missing_split(folder, phase, removed):
    shutil.rmtree(Path(folder.root) / removed)
    with raises_data_error(str(Path(folder.root) / removed)):
        build_splits(folder, phase, IMG)


def test_imagefolder_empty_split(folder):
    val = Path(folder.root) / "val"
    for f in val.rglob("*.*"):
        f.unlink()
    with raises_data_error(str(val), "no images"):
        build_splits(folder, "search", IMG)


def test_imagefolder_too_many_classes(folder):
    folder.num_classes = 2  # bird, cat, dog
    with raises_data_error(folder.root, "3 class folders"):
        build_splits(folder, "final", IMG)


# --------------------------------------------------------------------------- demo task


def demo_cfg(**kw) -> DataConfig:
    return DataConfig(kind="demo", demo_train=80, demo_val=20, demo_test=40, **kw)


def test_demo_splits_and_shapes():
    train, evals, k = build_splits(demo_cfg(), "search", IMG)
    assert (len(train), len(evals), k) == (80, 20, 4)
    train_f, test_f, _ = build_splits(demo_cfg(), "final", IMG)
    assert (len(train_f), len(test_f)) == (100, 40)
    # final train = search train followed by search val: same images, nothing regenerated
    assert torch.equal(train_f.images[:80], train.images)
    assert torch.equal(train_f.images[80:], evals.images)
    x, y = train[0]
    assert x.shape == (3, IMG, IMG) and x.dtype == torch.float32 and isinstance(y, int)
    assert sorted(set(train_f.targets)) == [0, 1, 2, 3]


def test_demo_resizes_to_img_size():
    train, _, _ = build_splits(demo_cfg(), "search", 48)
    assert train[0][0].shape == (3, 48, 48)


def test_demo_is_deterministic_and_seeded():
    a, _, _ = build_splits(demo_cfg(seed=3), "final", IMG)
    b, _, _ = build_splits(demo_cfg(seed=3), "final", IMG)
    c, _, _ = build_splits(demo_cfg(seed=4), "final", IMG)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a[5][0], b[5][0])
    assert not torch.equal(a.images, c.images)


def test_demo_splits_are_distinct():
    train, _ = make_demo_arrays(0, "train", 50)
    test, _ = make_demo_arrays(0, "test", 50)
    assert not np.array_equal(train, test)


def test_demo_global_colour_statistics_do_not_reveal_the_class():
    images, labels = make_demo_arrays(0, "train", 2000)
    channel_means = images.reshape(len(images), -1, 3).mean(1)  # [N, 3]
    per_class = np.stack([channel_means[labels == c].mean(0) for c in range(4)])
    # classes are balanced and only object *positions* depend on the label
    assert np.bincount(labels).tolist() == [500] * 4
    assert np.abs(per_class - per_class.mean(0)).max() < 2.0, per_class


@pytest.mark.parametrize("demo_classes", [2, 3])
def test_demo_classes(demo_classes):
    _, _, k = build_splits(demo_cfg(demo_classes=demo_classes), "search", IMG)
    assert k == demo_classes
    _, labels = make_demo_arrays(0, "val", 30, demo_classes)
    assert set(labels.tolist()) == set(range(demo_classes))


@pytest.mark.parametrize("kw,needle", [
    ({"demo_classes": 5}, "demo_classes"),
    ({"demo_classes": 4, "num_classes": 3}, "num_classes"),
    ({"demo_train": 0}, "train"),
])
def test_demo_bad_config(kw, needle):
    with raises_data_error(needle):
        build_splits(DataConfig(kind="demo", **kw), "search", IMG)


def test_unknown_kind():
    with raises_data_error("'nope'"):
        build_splits(DataConfig(kind="nope"), "search", IMG)


@pytest.mark.parametrize("kind", ["imagefolder", "demo"])
def test_normalisation_is_the_given_mean_and_std(folder, kind):
    """build_splits normalises with the mean/std it is given (data.normalize: model passes the
    backbone's), ImageNet's by default; the same pixels differ by exactly the two affine maps."""
    cfg = folder if kind == "imagefolder" else DataConfig(kind="demo", demo_train=8, demo_val=4, demo_test=4)
    default = build_splits(cfg, "search", IMG)[0][0][0]
    half = build_splits(cfg, "search", IMG, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))[0][0][0]
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    pixels = default * std + mean
    assert torch.allclose(half, (pixels - 0.5) / 0.5, atol=1e-5)
    assert not torch.allclose(half, default, atol=1e-2)


# --------------------------------------------------------------------------- mnist task (MNIST-5k, embedded)


def mnist_cfg(**kw) -> DataConfig:
    return DataConfig(kind="mnist", **{"demo_train": 300, "demo_val": 100, "demo_test": 200, **kw})


def test_mnist_splits_are_balanced_disjoint_and_real_digits():
    from engine.mnist import load_mnist5k

    images, labels = load_mnist5k()
    assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    train, val, k = build_splits(mnist_cfg(), "search", IMG)
    train_f, test, _ = build_splits(mnist_cfg(), "final", IMG)
    assert (len(train), len(val), len(train_f), len(test), k) == (300, 100, 400, 200, 10)
    for split, n in ((train, 30), (val, 10), (test, 20)):
        assert np.bincount(split.targets, minlength=10).tolist() == [n] * 10
    # the three splits share no image, and the final training set is train then val
    rows = lambda ds: {bytes(im[0].numpy()) for im in ds.images}  # noqa: E731
    assert not rows(train) & rows(val) and not (rows(train) | rows(val)) & rows(test)
    assert torch.equal(train_f.images, torch.cat([train.images, val.images]))
    # grey digits, repeated to three channels: a dark background and bright strokes
    assert torch.equal(train.images[:, 0], train.images[:, 1]) and torch.equal(train.images[:, 0], train.images[:, 2])
    assert train.images.float().mean() < 60 and train.images.max() == 255
    assert train[0][0].shape == (3, IMG, IMG)


def test_mnist_test_split_is_fixed_by_the_seed_alone():
    _, a, _ = build_splits(mnist_cfg(), "final", IMG)
    _, b, _ = build_splits(mnist_cfg(demo_train=2000, demo_val=500), "final", IMG)
    _, c, _ = build_splits(mnist_cfg(seed=1), "final", IMG)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_mnist_too_many_images():
    with raises_data_error("MNIST-5k has 5,000"):
        build_splits(mnist_cfg(demo_train=4000, demo_val=500, demo_test=1000), "search", IMG)
