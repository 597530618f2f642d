"""The mini-VTAB prepare step on a synthetic stand-in (no Debian package needed): the VTAB-1k and
few-shot layouts it writes parse with the project's loader, labels are in range, and no task image
is built from the backbone's training images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.minivtab import prepare as P
from engine.data import DataConfig, build_splits


def _synthetic(n_train=300, n_test=400, n_digits=1300, seed=0):
    rng = np.random.default_rng(seed)
    fm_train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    fm_test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    fm_test[:5] = fm_train[:5]  # exact duplicates of training images: must never be used
    digits = (rng.integers(0, 17, (n_digits, 8, 8)).astype(np.float64), np.arange(n_digits) % 10)
    return (fm_test, rng.integers(0, 10, n_test)), digits, fm_train


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    fm_test, digits, fm_train = _synthetic()
    root = tmp_path_factory.mktemp("minivtab")
    P.prepare(root, fm_test, digits, fm_train, n_test=60, log=lambda *_: None)
    return root, fm_test, digits, fm_train


@pytest.mark.parametrize("task", P.TASKS)
def test_vtab_layout_parses_with_project_loader(prepared, task):
    root = prepared[0]
    tdir = root / "vtab" / task
    counts = {n: len((tdir / f"{n}.txt").read_text().splitlines()) for n in ("train800", "val200", "train800val200", "test")}
    assert counts["train800"] == 800 and counts["val200"] == 200 and counts["train800val200"] == 1000
    for line in (tdir / "train800.txt").read_text().splitlines()[:3]:
        path, label = line.rsplit(" ", 1)
        assert path.startswith("images/train800/") and path.endswith(".png") and len(Path(path).stem) == 6
    for phase, (n_train, n_eval) in {"search": (800, 200), "final": (1000, counts["test"])}.items():
        train, evals, n_classes = build_splits(DataConfig(kind="vtab1k", root=str(root / "vtab"), task=task), phase, 28)
        assert (len(train), len(evals)) == (n_train, n_eval)
        assert n_classes == P.NUM_CLASSES[task]
        labels = train.targets + evals.targets
        assert min(labels) >= 0 and max(labels) < P.NUM_CLASSES[task]
        assert set(train.targets) == set(range(P.NUM_CLASSES[task]))  # every class is trained
        x, y = train[0]
        assert tuple(x.shape) == (3, 28, 28)
    # the lr-selection view: "final" trains on train800 and scores on val200, same files
    tr, ev, _ = build_splits(DataConfig(kind="vtab1k", root=str(root / "vtab"), task=f"{task}_lrsel"), "final", 28)
    _, val, _ = build_splits(DataConfig(kind="vtab1k", root=str(root / "vtab"), task=task), "search", 28)
    assert len(tr) == 800 and [Path(p).resolve() for p, _ in ev.samples] == [Path(p).resolve() for p, _ in val.samples]


def test_structured_labels_match_the_pictures(prepared):
    root = prepared[0]
    # counting: the number of items equals label + 1 (items are bright blocks on a black canvas)
    tdir = root / "vtab" / "counting"
    prov = json.loads((tdir / "provenance.json").read_text())
    for line in (tdir / "test.txt").read_text().splitlines()[:20]:
        path, label = line.rsplit(" ", 1)
        assert len(prov[path].split()) == int(label) + 1
    # location: the item's bounding box lies in the labelled cell of the 3x3 grid
    tdir = root / "vtab" / "location"
    for line in (tdir / "test.txt").read_text().splitlines()[:20]:
        path, label = line.rsplit(" ", 1)
        a = np.asarray(Image.open(tdir / path))
        ys, xs = np.nonzero(a)
        assert (ys.min() // 14) * 3 + xs.min() // 14 == int(label)


def test_no_task_image_comes_from_backbone_training_data(prepared):
    root, (fm_test, _), _, fm_train = prepared
    train_hashes = P.image_hashes(fm_train)
    dup = {i for i in range(len(fm_test)) if P.image_hashes(fm_test[i:i + 1]) <= train_hashes}
    assert dup == {0, 1, 2, 3, 4}
    used = set()
    for task in P.TASKS:
        tdir = root / "vtab" / task
        prov = json.loads((tdir / "provenance.json").read_text())
        for src in prov.values():
            for item in src.split():
                assert item.startswith(("fashion-mnist:test:", "digits:")), item
                if item.startswith("fashion-mnist:test:"):
                    used.add(int(item.rsplit(":", 1)[1]))
        # and no written image equals a backbone training image pixel for pixel
        for split in ("train800", "test"):
            for png in sorted((tdir / "images" / split).glob("*.png"))[:50]:
                a = np.asarray(Image.open(png))
                if a.shape == (28, 28):
                    assert not P.image_hashes(a[None]) <= train_hashes
    assert used and not (used & dup)


def test_splits_use_disjoint_source_items(prepared):
    root = prepared[0]
    for task in P.TASKS:
        prov = json.loads((root / "vtab" / task / "provenance.json").read_text())
        by_split = {}
        for rel, src in prov.items():
            by_split.setdefault(rel.split("/")[1], set()).update(src.split())
        assert not by_split["train800"] & by_split["test"], task
        assert not by_split["val200"] & by_split["test"], task
        assert not by_split["train800"] & by_split["val200"], task


def test_fewshot_and_dg_layout(prepared):
    root = prepared[0]
    for ds in ("digits", "digits_inverted", "digits_edges", "digits_blurred"):
        for shots in P.SHOTS:
            for seed in P.FEWSHOT_SEEDS:
                cfg = DataConfig(kind="fewshot", root=str(root / "fewshot"), dataset=ds, shots=shots, seed=seed)
                train, val, n = build_splits(cfg, "search", 28)
                assert n == 10 and len(train) == 10 * shots
                assert sorted(train.targets) == sorted(list(range(10)) * shots)
        _, test, _ = build_splits(DataConfig(kind="fewshot", root=str(root / "fewshot"), dataset=ds), "final", 28)
        train_files = {p for f in (root / "fewshot" / ds / "annotations").glob("train_meta*") for p in f.read_text().split()[::2]}
        assert not train_files & {Path(p).name for p, _ in test.samples}
    a = np.asarray(Image.open(root / "fewshot" / "digits" / "images" / "000000.png"), dtype=int)
    b = np.asarray(Image.open(root / "fewshot" / "digits_inverted" / "images" / "000000.png"), dtype=int)
    assert (a + b == 255).all()


def test_prepare_is_deterministic(tmp_path):
    fm_test, digits, fm_train = _synthetic(n_test=200)
    outs = []
    for run in ("a", "b"):
        P.write_vtab_task(tmp_path / run, "counting", P.make_task("counting", fm_test, digits, fm_train, n_test=20))
        outs.append([p.read_bytes() for p in sorted((tmp_path / run / "counting").rglob("*")) if p.is_file()])
    assert outs[0] == outs[1]


def test_missing_fashion_mnist_message(monkeypatch, tmp_path):
    from benchmarks.minivtab import fmnist

    monkeypatch.setattr(fmnist, "FMNIST_DIR", tmp_path)
    with pytest.raises(fmnist.FashionMNISTMissing, match="apt-get install dataset-fashion-mnist"):
        fmnist.load("train")


# ---------------------------------------------------------------------- the driver's bookkeeping
def _bare_runner(tmp_path, mode="full"):
    from benchmarks.minivtab import run as R

    runner = R.Runner.__new__(R.Runner)  # no backbone / data needed for the bookkeeping under test
    runner.mode, runner.m = mode, R.MODES[mode]
    runner.root, runner.runs, runner.log = tmp_path, tmp_path / "runs", lambda *_: None
    runner.results = R.Results(tmp_path / "results.json", {"mode": mode, "settings": {}, "lr_grid": {}, "backbone": "b", "protocol": R.PROTOCOL})
    return runner


@pytest.mark.parametrize("peak, expected_tried, expected", [
    (1.0, ["0.003", "0.01", "0.03", "0.09", "0.27"], 0.27),   # keeps climbing: extended twice, stops at the limit
    (0.05, ["0.003", "0.01", "0.03", "0.09"], 0.03),         # one step up finds the peak inside
    (0.01, ["0.003", "0.01", "0.03"], 0.01),                 # interior optimum: no extension
    (1e-4, ["0.001", "0.00033", "0.003", "0.01", "0.03"], 0.00033),  # extends downwards
])
def test_lr_grid_extends_past_an_edge(tmp_path, peak, expected_tried, expected):
    import math

    runner = _bare_runner(tmp_path)
    tried = []

    def fake_retrain(method, out, data, epochs, lr, seed, sup_dir=None, warmup=1):
        tried.append(f"{lr:g}")
        return {"test_top1": 100 - abs(math.log(lr / peak)), "wall_s": 0.0}

    runner.retrain = fake_retrain
    assert runner.choose_lr("digits", "lora4", None) == pytest.approx(expected)
    assert sorted(tried, key=float) == sorted(expected_tried, key=float)
    sel = json.loads((tmp_path / "results.json").read_text())["lr_selection"]["digits/lora4"]
    assert sel["chosen"] == pytest.approx(expected) and len(sel["val_top1"]) == len(expected_tried)
    tried.clear()
    assert runner.choose_lr("digits", "lora4", None) == pytest.approx(expected) and tried == []  # cached


def test_workers_split_cells_and_keep_each_others_results(tmp_path):
    """Two workers sharing one claims folder run every cell exactly once, and their interleaved
    writes to results.json all survive."""
    from benchmarks.minivtab import run as R

    a, b = _bare_runner(tmp_path), _bare_runner(tmp_path)
    b.results = R.Results(tmp_path / "results.json")  # a second process opens the same file
    ran = []
    claims = tmp_path / "claims"
    claims.mkdir()
    cells = a.cells("vtab")
    import threading
    import time

    def slow(r, name, cell):
        time.sleep(0.002)
        ran.append((name, cell))
        r.results.put("runs", "/".join(map(str, cell)), name)

    a.run_cell = lambda phase, cell: slow(a, "a", cell)
    b.run_cell = lambda phase, cell: slow(b, "b", cell)
    threads = [threading.Thread(target=r.run, args=("vtab", claims)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c for _, c in ran) == sorted(cells) and len(ran) == len(cells)
    saved = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(saved) == len(cells)
    assert {n for n, _ in ran} == {"a", "b"}


def test_report_compares_each_glora_space_with_its_budget_lora(tmp_path):
    from benchmarks.minivtab.report import comparison_table

    def run(method, task, seed, acc, params):
        return {"track": "vtab", "task": task, "method": method, "seed": seed, "test_top1": acc, "adapter_params": params}

    runs = {}
    for seed, (g, lo, g8, l8) in enumerate([(90.0, 85.0, 80.0, 80.5), (91.0, 86.0, 81.0, 80.0), (92.0, 84.0, 79.0, 80.2)]):
        runs[f"a{seed}"] = run("glora_middle", "digits", seed, g, 20000)
        runs[f"b{seed}"] = run("lora4", "digits", seed, lo, 24576)
        runs[f"c{seed}"] = run("glora_large", "digits", seed, g8, 40000)
        runs[f"d{seed}"] = run("lora8", "digits", seed, l8, 49152)
    table = comparison_table({"runs": runs})
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "+6.0 win" in rows["glora_middle vs lora4"] and "20,000 / 24,576" in rows["glora_middle vs lora4"]
    assert "-0.2 tie" in rows["glora_large vs lora8"]
    assert "glora_small vs lora4" not in rows  # no runs, no row


@pytest.mark.slow
def test_driver_end_to_end_on_stand_in_data(prepared, tmp_path):
    """The whole driver (lr selection with extension, supernet + search + retrain, the few-shot
    phase with its domain-generalisation evaluations, the report) in its ``smoke`` mode, on the
    synthetic stand-in tasks and a randomly initialised backbone."""
    import timm
    from safetensors.torch import save_file

    from benchmarks.minivtab import MODEL_KWARGS, MODEL_NAME
    from benchmarks.minivtab import run as R
    from benchmarks.minivtab.report import write_report

    root = prepared[0]
    torch_model = timm.create_model(MODEL_NAME, num_classes=10, **MODEL_KWARGS)
    ckpt = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, str(ckpt))
    results_path = tmp_path / "results.json"
    meta = {"mode": "smoke", "settings": R.MODES["smoke"], "lr_grid": {}, "backbone": ckpt.name, "protocol": R.PROTOCOL}
    runner = R.Runner("smoke", ckpt, root, R.Results(results_path, meta), log=lambda *_: None, runs_root=tmp_path / "runs")
    for phase in ("vtab", "fewshot"):
        runner.run(phase)
    data = json.loads(results_path.read_text())
    runs = data["runs"]
    assert set(runs) == {"vtab/digits/lora4/0", "vtab/digits/glora_large/supernet", "vtab/digits/glora_large/0",
                         "fewshot/digits/lora8/16/0", "fewshot/digits/glora_large/16/0"}
    assert runs["vtab/digits/lora4/0"]["adapter_params"] == runner.budgets["lora4"]
    assert 0 < runs["vtab/digits/glora_large/0"]["adapter_params"] <= runner.budgets["lora8"]
    for key in ("fewshot/digits/lora8/16/0", "fewshot/digits/glora_large/16/0"):
        assert set(runs[key]["dg"]) == {"inverted", "edges", "blurred"}
        assert all(0 <= v <= 100 for v in runs[key]["dg"].values())
    # one base lr, extended once: two values scored per (task, method), the few-shot lora8 included
    assert {k: len(v["val_top1"]) for k, v in data["lr_selection"].items()} == {
        "digits/lora4": 2, "digits/glora_large": 2, "digits/lora8": 2}
    md = write_report(results_path)
    assert "glora_large vs lora8" in md and (tmp_path / "results.png").stat().st_size > 0
    # a rerun finds everything done and trains nothing
    again = R.Runner("smoke", ckpt, root, R.Results(results_path), log=lambda *_: None, runs_root=tmp_path / "runs")
    again.retrain = again.supernet = lambda *a, **k: pytest.fail("a finished cell ran again")
    for phase in ("vtab", "fewshot"):
        again.run(phase)
