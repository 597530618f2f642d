"""The CNN track's tasks, written in the VTAB-1k and few-shot list layouts by the replica's own
writers (benchmarks/minivtab/prepare.py), from real images available offline:

  natural:     mnist         MNIST-5k (engine/assets, 5,000 real MNIST digits), 10 classes
               fashion       Fashion-MNIST *test* items, 10 classes (the clothing category)
  specialized: mnist_noisy   the same MNIST digits degraded: blur + Gaussian noise sigma 70
  structured:  orientation   a Fashion-MNIST test item rotated 0/90/180/270: predict the rotation
               counting      1-4 test items on a 56 px canvas: predict the count
               location      one test item in one of 9 cells of a 42 px canvas: predict the cell
Few-shot: ``mnist`` with 1/2/4/8/16 shots x seeds 0-2 drawn from the same train800 pool; domain
generalisation: the same lists on inverted, edge-only and blurred renderings.

Every task: train800 / val200 / a fixed test split of ``n_test`` images, disjoint source items
(``provenance.json``). The structured tasks are the replica's generators (same seeds, same items),
so the two tracks' structured tasks are the same pictures; the loader resizes every image to the
track's resolution. The backbone is ImageNet's, so no task image can come from its training data;
Fashion-MNIST's test split is still the only one used, as in the replica.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from benchmarks.minivtab import prepare as P

GROUPS = {"natural": ["mnist", "fashion"], "specialized": ["mnist_noisy"],
          "structured": ["orientation", "counting", "location"]}
TASKS = [t for ts in GROUPS.values() for t in ts]
NUM_CLASSES = {"mnist": 10, "fashion": 10, "mnist_noisy": 10, "orientation": 4, "counting": 4, "location": 9}
# seeds of the new tasks' generators; the structured tasks keep the replica's (P.TASK_IDS)
_IDS = {"mnist": 100, "fashion": 101, "mnist_noisy": 100}


def mnist_partition(n: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    part = P.digits_partition(n, seed=seed)
    part["test"] = part["test"][:n_test]  # a fixed test split: the first n_test of the held-out rest
    return part


def make_task(task: str, fm_test: tuple[np.ndarray, np.ndarray], mnist: tuple[np.ndarray, np.ndarray],
              n_test: int = 1000, seed: int = 0) -> dict:
    """{split: (list of uint8 images, int labels, list of provenance strings)} for one task."""
    if task in ("orientation", "counting", "location"):
        return P.make_task(task, fm_test, None, None, n_test, seed)
    if task not in _IDS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, _IDS[task]])
    out = {}
    if task == "fashion":
        items, labels = fm_test
        pools = P._split_pools(rng, P.eligible_items(items, None), n_test)
        for split, n in {"train800": 800, "val200": 200, "test": n_test}.items():
            if len(pools[split]) < n:
                raise ValueError(f"fashion: {len(pools[split])} items for the {n}-image {split} split")
            idx = pools[split][:n]
            out[split] = ([items[i] for i in idx], [int(labels[i]) for i in idx], [f"fashion-mnist:test:{i}" for i in idx])
        return out
    m_img, m_lab = mnist
    for split, idx in mnist_partition(len(m_img), n_test, seed).items():
        imgs = [np.asarray(m_img[i]) for i in idx]
        if task == "mnist_noisy":
            imgs = [P.degrade(im, rng) for im in imgs]
        out[split] = (imgs, [int(m_lab[i]) for i in idx], [f"mnist5k:{i}" for i in idx])
    return out


def prepare(root: Path, fm_test, mnist, n_test: int = 1000, seed: int = 0, tasks=TASKS, fewshot: bool = True,
            log=print) -> Path:
    """Write every task under ``root`` (vtab/ and fewshot/); returns root. Pure function of its inputs."""
    root = Path(root)
    for task in tasks:
        P.write_vtab_task(root / "vtab", task, make_task(task, fm_test, mnist, n_test, seed))
        log(f"prepare: {task} -> {root / 'vtab' / task}")
    if fewshot:
        m_img, m_lab = mnist
        P.write_fewshot_images(root / "fewshot", "mnist", [np.asarray(im) for im in m_img], m_lab,
                               mnist_partition(len(m_img), n_test, seed), seed)
        log(f"prepare: few-shot/DG mnist -> {root / 'fewshot'}")
    return root


def load_sources():
    """(fm_test, mnist) from the Debian package and the project's MNIST-5k."""
    from benchmarks.minivtab import fmnist
    from engine.mnist import load_mnist5k

    return fmnist.load("test"), load_mnist5k()


def source_hash(n_test: int, seed: int) -> str:
    from benchmarks.minivtab import fmnist
    from engine.mnist import MNIST_FILE

    h = hashlib.sha256(Path(__file__).read_bytes() + Path(P.__file__).read_bytes())
    h.update(f"{n_test}/{seed}".encode())
    for p in fmnist.files("test") + [MNIST_FILE]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def prepare_cached(data_dir: Path, n_test: int = 1000, seed: int = 0, log=print) -> Path:
    """``prepare`` into ``data_dir/<hash>`` unless it is already complete there."""
    root = Path(data_dir) / source_hash(n_test, seed)
    if (root / "DONE").is_file():
        return root
    fm_test, mnist = load_sources()
    prepare(root, fm_test, mnist, n_test, seed, log=log)
    (root / "DONE").write_text("ok\n")
    return root
