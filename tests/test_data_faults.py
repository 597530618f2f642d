"""The image files a user hands over: bad ones are named (path and list line) when a split is built,
before any training step, and through the CLIs with exit status 2 and nothing written; unusual but
valid ones (16-bit, CMYK, palette, RGBA) load as the RGB image they show."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.data import DataConfig, DataError, build_splits
from runcfg import write_config
from test_data import IMG, VTAB_SPLITS, write_image, write_list  # noqa: F401  (fixtures below reuse them)
from test_data import folder, vtab  # noqa: F401

RAW = DataConfig(kind="vtab1k", normalize="imagenet")


def _pixels(ds, index: int) -> torch.Tensor:
    """The uint8 RGB values the dataset decoded (undoing its normalisation with mean 0, std 1)."""
    x, _ = ds[index]
    return (x * 255).round().to(torch.int64)


def _one_image_split(vtab, path_rel: str, img: Image.Image, fmt: str, cache: str):
    task = Path(vtab.root) / vtab.task
    img.save(task / path_rel, format=fmt)
    vtab.cache = cache
    train, _, _ = build_splits(vtab, "search", IMG, mean=(0, 0, 0), std=(1, 1, 1))
    index = [p for p, _ in VTAB_SPLITS["train800"]].index(path_rel)
    return _pixels(train, index)


@pytest.mark.parametrize("cache", ["never", "always"])
def test_16_bit_png_is_scaled_not_clipped(vtab, cache):
    # a flat 16-bit grey of 0x8080 (PIL's convert("RGB") would clip it to 255, white)
    img = Image.fromarray(np.full((IMG, IMG), 0x8080, dtype=np.uint16))
    assert img.mode.startswith("I;16")
    x = _one_image_split(vtab, "images/train800/000000.png", img, "PNG", cache)
    assert x.unique().tolist() == [128]


@pytest.mark.parametrize("cache", ["never", "always"])
def test_cmyk_palette_rgba_load_as_the_rgb_they_show(vtab, cache):
    rgb = (200, 40, 10)
    flat = Image.new("RGB", (IMG, IMG), rgb)
    for rel, img, fmt in [("images/train800/000000.png", flat.convert("P"), "PNG"),
                          ("images/train800/000002.png", flat.convert("RGBA"), "PNG"),
                          ("images/train800/000001.jpg", flat.convert("CMYK"), "JPEG")]:
        x = _one_image_split(vtab, rel, img, fmt, cache)
        mean = x.float().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(rgb, dtype=torch.float32), atol=6), (rel, mean)


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def test_truncated_jpeg_is_found_without_the_cache(vtab):
    path = Path(vtab.root) / vtab.task / "images/train800/000001.jpg"
    path.write_bytes(_truncated_jpeg())
    vtab.cache = "never"
    with pytest.raises(DataError, match="train800.txt: line 2: .*000001.jpg: cannot decode image"):
        build_splits(vtab, "search", IMG)


def test_empty_class_folder_is_named(folder):  # noqa: F811
    empty = Path(folder.root) / "train" / "cat"
    for f in empty.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=f"{empty}: empty class folder"):
        build_splits(folder, "search", IMG)


def _break(task: Path, fault: str) -> str:
    """Apply one fault to the vtab fixture; the text the error must contain."""
    lst = task / "train800.txt"
    if fault == "missing image":
        (task / "images/train800/000001.jpg").unlink()
        return f"{lst}: line 2: image not found"
    if fault == "label out of range":
        lst.write_text(lst.read_text().replace("000003.png 1", "000003.png 9"))
        return f"{lst}: line 4: label 9 >= num_classes"
    if fault == "malformed line":
        lst.write_text(lst.read_text() + "just-a-path.png\n")
        return f"{lst}: line 5: expected '<image path> <label>'"
    if fault == "label not a number":
        lst.write_text(lst.read_text().replace("000003.png 1", "000003.png one"))
        return f"{lst}: line 4: label 'one' is not an integer"
    if fault == "corrupt image":
        (task / "images/train800/000002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        return f"{lst}: line 3: {task / 'images/train800/000002.png'}: cannot decode image"
    if fault == "blank list":
        lst.write_text("\n\n   \n")
        return f"{lst}: list file is empty"
    raise AssertionError(fault)


@pytest.mark.parametrize("cache", ["never", "auto"])
@pytest.mark.parametrize("fault", ["missing image", "label out of range", "malformed line", "label not a number",
                                   "corrupt image", "blank list"])
def test_data_faults_through_the_cli(vtab, fault, cache, tmp_path, capsys):
    """Each fault ends train.py with one line naming the list file (and line), exit status 2, before
    anything is written."""
    needle = _break(Path(vtab.root) / vtab.task, fault)
    out = tmp_path / "out"
    data = {"kind": "vtab1k", "root": vtab.root, "task": vtab.task, "cache": cache,
            "num_classes": 5 if fault == "label out of range" else None}
    cfg = write_config(tmp_path / "c.yaml", out, data=data)
    code = main("train", ["--config", str(cfg)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and not out.exists()
