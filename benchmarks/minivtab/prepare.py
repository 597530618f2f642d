"""Write the mini-VTAB tasks to disk as PNG files plus list files, in the layouts the project's
loader reads (docs/method.md §7):

    <root>/vtab/<task>/{train800,val200,train800val200,test}.txt    lines: images/<split>/<i:06d>.png <label>
    <root>/vtab/<task>_lrsel/...          learning-rate selection view: "final" = train800 -> val200
    <root>/fewshot/<dataset>/annotations/{train_meta.list.num_shot_<k>.seed_<s>,val_meta.list,test_meta.list}
    <root>/fewshot/<dataset>/images/<i:06d>.png

Tasks (group: task):
  natural:     digits        scikit-learn's 8x8 handwritten digits, bicubic upscale to 28 px, 10 classes
  specialized: digits_noisy  the same digits in a degraded domain: blur + heavy Gaussian noise
  structured:  orientation   a Fashion-MNIST TEST image rotated by 0/90/180/270 degrees: predict the rotation
               counting      1-4 Fashion-MNIST TEST items on a 56 px canvas: predict the count
               location      one Fashion-MNIST TEST item in one of 9 cells of a 42 px canvas: predict the cell
Few-shot: ``digits`` with 1/2/4/8/16 shots x seeds 0-2; domain generalisation: the same lists over
``digits_inverted``, ``digits_edges`` and ``digits_blurred`` renderings (train on ``digits``, test there).

No task image is built from the backbone's training images: structured tasks draw their items
from Fashion-MNIST's test split only, and any test image whose pixels equal a training image
(exact duplicates) is excluded first. Each task folder gets ``provenance.json`` naming the source
of every item. Everything is a pure function of the input arrays and ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

VTAB_SPLITS = {"train800": 800, "val200": 200}
GROUPS = {"natural": ["digits"], "specialized": ["digits_noisy"],
          "structured": ["orientation", "counting", "location"]}
TASKS = [t for ts in GROUPS.values() for t in ts]
NUM_CLASSES = {"digits": 10, "digits_noisy": 10, "orientation": 4, "counting": 4, "location": 9}
SHOTS = (1, 2, 4, 8, 16)
FEWSHOT_SEEDS = (0, 1, 2)
DG_DOMAINS = ("inverted", "edges", "blurred")
TASK_IDS = {t: i for i, t in enumerate(TASKS)}


# --------------------------------------------------------------------------- sources
def image_hashes(images: np.ndarray) -> set[str]:
    return {hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


def eligible_items(test_images: np.ndarray, train_images: np.ndarray | None) -> np.ndarray:
    """Indices of test images whose pixels differ from every backbone training image."""
    if train_images is None:
        return np.arange(len(test_images))
    seen = image_hashes(train_images)
    return np.array([i for i, im in enumerate(test_images)
                     if hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() not in seen], dtype=np.int64)


def render_digit(img8: np.ndarray, size: int = 28) -> np.ndarray:
    """An 8x8 digit (0..16) as a uint8 size x size image (bicubic upscale)."""
    a = np.clip(np.asarray(img8, dtype=np.float64) * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return np.asarray(Image.fromarray(a, "L").resize((size, size), Image.BICUBIC))


def degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The 'specialized' domain: Gaussian blur (radius 1) then heavy additive noise (sigma 70)."""
    blurred = np.asarray(Image.fromarray(img, "L").filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)
    return np.clip(blurred + rng.normal(0, 70, img.shape), 0, 255).round().astype(np.uint8)


def shift_domain(img: np.ndarray, domain: str) -> np.ndarray:
    pil = Image.fromarray(img, "L")
    if domain == "inverted":
        return (255 - img).astype(np.uint8)
    if domain == "edges":
        return np.asarray(pil.filter(ImageFilter.FIND_EDGES))
    if domain == "blurred":
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(2)))
    raise ValueError(f"unknown domain {domain!r}")


def _shrink(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img, "L").resize((size, size), Image.BICUBIC))


def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % k)


def _split_pools(rng: np.random.Generator, pool: np.ndarray, n_test: int) -> dict[str, np.ndarray]:
    """Disjoint source-item pools per split, proportional to the split sizes."""
    perm = rng.permutation(pool)
    total = 800 + 200 + n_test
    a = len(perm) * 800 // total
    b = a + len(perm) * 200 // total
    return {"train800": perm[:a], "val200": perm[a:b], "test": perm[b:]}


# --------------------------------------------------------------------------- tasks
def digits_partition(n: int, n_train: int = 800, n_val: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    perm = np.random.default_rng([seed, 99]).permutation(n)
    return {"train800": perm[:n_train], "val200": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}


def make_task(task: str, fm_test: tuple[np.ndarray, np.ndarray], digits: tuple[np.ndarray, np.ndarray],
              fm_train: np.ndarray | None = None, n_test: int = 1000, seed: int = 0):
    """{split: (list of uint8 images, int labels, list of provenance strings)} for one task."""
    rng = np.random.default_rng([seed, TASK_IDS[task]])
    out = {}
    if task in ("digits", "digits_noisy"):
        d_img, d_lab = digits
        for split, idx in digits_partition(len(d_img), seed=seed).items():
            imgs = [render_digit(d_img[i]) for i in idx]
            if task == "digits_noisy":
                imgs = [degrade(im, rng) for im in imgs]
            out[split] = (imgs, [int(d_lab[i]) for i in idx], [f"digits:{i}" for i in idx])
        return out
    items, _ = fm_test
    pools = _split_pools(rng, eligible_items(items, fm_train), n_test)
    sizes = {"train800": 800, "val200": 200, "test": n_test}
    for split, n in sizes.items():
        pool = pools[split]
        imgs, labels, prov = [], [], []
        if task == "orientation":
            labels = _balanced(rng, n, 4).tolist()
            picks = rng.choice(pool, n, replace=len(pool) < n)
            for k, i in zip(labels, picks):
                imgs.append(np.ascontiguousarray(np.rot90(items[i], k)))
                prov.append(f"fashion-mnist:test:{i}")
        elif task == "counting":
            labels = _balanced(rng, n, 4).tolist()
            for lab in labels:
                canvas = np.zeros((56, 56), dtype=np.uint8)
                cells = rng.choice(16, lab + 1, replace=False)
                picks = rng.choice(pool, lab + 1, replace=False)
                for c, i in zip(cells, picks):
                    y, x = 14 * (c // 4) + int(rng.integers(0, 3)), 14 * (c % 4) + int(rng.integers(0, 3))
                    canvas[y:y + 12, x:x + 12] = np.maximum(canvas[y:y + 12, x:x + 12], _shrink(items[i], 12))
                imgs.append(canvas)
                prov.append(" ".join(f"fashion-mnist:test:{i}" for i in picks))
        elif task == "location":
            labels = _balanced(rng, n, 9).tolist()
            picks = rng.choice(pool, n, replace=len(pool) < n)
            for c, i in zip(labels, picks):
                canvas = np.zeros((42, 42), dtype=np.uint8)
                y, x = 14 * (c // 3) + int(rng.integers(0, 3)), 14 * (c % 3) + int(rng.integers(0, 3))
                canvas[y:y + 12, x:x + 12] = _shrink(items[i], 12)
                imgs.append(canvas)
                prov.append(f"fashion-mnist:test:{i}")
        else:
            raise ValueError(f"unknown task {task!r}")
        out[split] = (imgs, [int(v) for v in labels], prov)
    return out


# --------------------------------------------------------------------------- writing
def _save_png(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, "L").save(path, format="PNG")


def write_vtab_task(root: Path, task: str, splits: dict) -> Path:
    """Writes images + the four list files + provenance.json + the ``<task>_lrsel`` view."""
    tdir = Path(root) / task
    lines: dict[str, list[str]] = {}
    provenance = {}
    for split in ("train800", "val200", "test"):
        imgs, labels, prov = splits[split]
        lines[split] = []
        for i, (img, lab, src) in enumerate(zip(imgs, labels, prov)):
            rel = f"images/{split}/{i:06d}.png"
            _save_png(img, tdir / rel)
            lines[split].append(f"{rel} {lab}")
            provenance[rel] = src
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for name, ls in lines.items():
        (tdir / f"{name}.txt").write_text("\n".join(ls) + "\n")
    (tdir / "provenance.json").write_text(json.dumps(provenance, indent=0, sort_keys=True) + "\n")
    # Learning-rate selection view: the "final" phase trains on train800 and tests on val200, so
    # any method (retrain.py included) can be scored on validation data without touching test.
    ldir = Path(root) / f"{task}_lrsel"
    ldir.mkdir(parents=True, exist_ok=True)
    up = lambda ls: [f"../{task}/{l}" for l in ls]  # noqa: E731
    views = {"train800": lines["train800"], "val200": lines["val200"], "train800val200": lines["train800"], "test": lines["val200"]}
    for name, ls in views.items():
        (ldir / f"{name}.txt").write_text("\n".join(up(ls)) + "\n")
    return tdir


def write_fewshot(root: Path, digits: tuple[np.ndarray, np.ndarray], seed: int = 0,
                  shots=SHOTS, seeds=FEWSHOT_SEEDS, domains=DG_DOMAINS) -> list[Path]:
    """``digits`` (source rendering) plus one dataset per shifted domain, with identical lists."""
    d_img, d_lab = digits
    return write_fewshot_images(root, "digits", [render_digit(im) for im in d_img], d_lab,
                                digits_partition(len(d_img), seed=seed), seed, shots, seeds, domains)


def write_fewshot_images(root: Path, name: str, images: list[np.ndarray], labels: np.ndarray, part: dict[str, np.ndarray],
                         seed: int = 0, shots=SHOTS, seeds=FEWSHOT_SEEDS, domains=DG_DOMAINS) -> list[Path]:
    """Dataset ``name`` (uint8 ``images``, int ``labels``) in the few-shot list layout: k shots per
    class drawn from ``part["train800"]`` for each (k, seed), val from ``part["val200"]``, test from
    ``part["test"]``; plus ``<name>_<domain>`` per shifted domain with identical lists."""
    labels = np.asarray(labels)
    train_pool = part["train800"]
    lists = {"val_meta.list": part["val200"], "test_meta.list": part["test"]}
    for k in shots:
        for s in seeds:
            rng = np.random.default_rng([seed, k, s, 7])
            chosen = []
            for c in sorted(set(int(v) for v in labels[train_pool])):
                cand = train_pool[labels[train_pool] == c]
                chosen += rng.choice(cand, min(k, len(cand)), replace=False).tolist()
            lists[f"train_meta.list.num_shot_{k}.seed_{s}"] = np.array(sorted(chosen))
    used = sorted({int(i) for idx in lists.values() for i in idx})  # only the images some list names
    written = []
    for dname in (name,) + tuple(f"{name}_{d}" for d in domains):
        ddir = Path(root) / dname
        domain = dname[len(name) + 1:] if dname != name else None
        for i in used:
            im = images[i]
            _save_png(shift_domain(im, domain) if domain else im, ddir / "images" / f"{i:06d}.png")
        (ddir / "annotations").mkdir(parents=True, exist_ok=True)
        for fname, idx in lists.items():
            (ddir / "annotations" / fname).write_text("".join(f"{int(i):06d}.png {int(labels[i])}\n" for i in idx))
        written.append(ddir)
    return written


def prepare(root: Path, fm_test, digits, fm_train=None, n_test: int = 1000, seed: int = 0, tasks=TASKS,
            fewshot: bool = True, log=print) -> Path:
    """Write every task under ``root`` (vtab/ and fewshot/); returns root. Pure function of its inputs."""
    root = Path(root)
    for task in tasks:
        write_vtab_task(root / "vtab", task, make_task(task, fm_test, digits, fm_train, n_test, seed))
        log(f"prepare: {task} -> {root / 'vtab' / task}")
    if fewshot:
        write_fewshot(root / "fewshot", digits, seed)
        log(f"prepare: few-shot/DG digits -> {root / 'fewshot'}")
    return root


def load_sources():
    """(fm_test, digits, fm_train_images) from the Debian package and scikit-learn."""
    from sklearn.datasets import load_digits

    from . import fmnist

    fm_train, _ = fmnist.load("train")
    fm_test = fmnist.load("test")
    d = load_digits()
    return fm_test, (d.images, d.target.astype(np.int64)), fm_train


def source_hash(n_test: int, seed: int) -> str:
    from . import fmnist

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{n_test}/{seed}".encode())
    for p in fmnist.files("test") + fmnist.files("train"):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def prepare_cached(data_dir: Path, n_test: int = 1000, seed: int = 0, log=print) -> Path:
    """``prepare`` into ``data_dir/<hash>`` unless it is already complete there."""
    root = Path(data_dir) / source_hash(n_test, seed)
    if (root / "DONE").is_file():
        return root
    fm_test, digits, fm_train = load_sources()
    prepare(root, fm_test, digits, fm_train, n_test, seed, log=log)
    (root / "DONE").write_text("ok\n")
    return root
