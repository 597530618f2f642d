"""engine.report: a sweep's finished runs gathered into the paper's tables (VTAB-1k groups, few-shot)."""

from __future__ import annotations

import json

import pytest
import yaml

from engine.report import VTAB_GROUPS, main


def make_run(root, name, data, top1, method="glora", rank=8, seed=0, budget=290000, finished=True):
    run = root / name
    (run / "retrain").mkdir(parents=True)
    cfg = {"output_dir": str(run), "space": "configs/space/large.yaml", "data": data,
           "retrain": {"seed": seed, "rank": rank, "preset": None if method == "glora" else method}}
    (run / "retrain" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if method == "glora":
        (run / "search").mkdir()
        (run / "search" / "result.yaml").write_text(yaml.safe_dump({"budget": {"max_params": budget, "min_params": None}}))
    if finished:
        metrics = {"test_top1": top1, "test_images": 100, "adapter_params": 1000, "method": method,
                   "subnet_from_search": method == "glora"}
        (run / "retrain" / "metrics.json").write_text(json.dumps(metrics))
    return run


def vtab(task):
    return {"kind": "vtab1k", "root": "data/vtab-1k", "task": task}


@pytest.fixture
def sweep(tmp_path):
    """GLoRA on all 19 tasks (natural 80, specialized 90, structured 60; cifar twice, 79 and 81, one
    of them under another spelling); LoRA r8 on three natural tasks; one run not finished."""
    base = {"natural": 80.0, "specialized": 90.0, "structured": 60.0}
    for group, tasks in VTAB_GROUPS.items():
        for task in tasks:
            if task != "cifar":
                make_run(tmp_path, f"glora/{task}", vtab(task), base[group])
    make_run(tmp_path, "glora/cifar", vtab("cifar"), 79.0)
    make_run(tmp_path, "glora/cifar-seed1", vtab("cifar100"), 81.0, seed=1)
    for task in ("cifar", "dtd", "svhn"):
        make_run(tmp_path, f"lora/{task}", vtab(task), 70.0, method="lora", rank=8)
    make_run(tmp_path, "lora/kitti", vtab("kitti"), 0.0, method="lora", finished=False)
    return tmp_path


def test_vtab_groups_and_averages(sweep, capsys):
    assert main([str(sweep), "--json", str(sweep / "report.json")]) == 0
    out = capsys.readouterr().out
    glora = next(line for line in out.splitlines() if line.startswith("| glora large <=290,000 |"))
    cells = [c.strip() for c in glora.strip("|").split("|")]
    assert cells[2] == "80.0±1.4"  # cifar: the two seeds, "cifar100" counted as cifar
    assert cells[-5:] == ["80.0", "90.0", "60.0", "76.7", "73.7"]  # groups, mean of groups, mean of 19 tasks
    lora = next(line for line in out.splitlines() if line.startswith("| lora8 |"))
    assert "70.0 (3/7)" in lora and "needs all 19 tasks" in lora and "70.0 (3 tasks)" in lora
    assert "Unfinished (no retrain/metrics.json): 1" in out and "lora/kitti" in out

    report = json.loads((sweep / "report.json").read_text())
    summary = report["vtab1k"]["glora large <=290,000"]
    assert summary["average_of_groups"] == pytest.approx((80 + 90 + 60) / 3)
    assert summary["mean_of_tasks"] == pytest.approx((7 * 80 + 4 * 90 + 8 * 60) / 19)
    assert len(report["runs"]) == 23 and report["unfinished"] == [str(sweep / "lora" / "kitti")]


def test_fewshot_table(tmp_path, capsys):
    for shots, values in ((1, (30.0, 40.0, 50.0)), (16, (80.0, 80.0, 80.0))):
        for seed, top1 in enumerate(values):
            make_run(tmp_path, f"pets-{shots}-{seed}", {"kind": "fewshot", "dataset": "oxford_pets", "shots": shots, "seed": seed}, top1)
    assert main([str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| oxford_pets |"))
    assert [c.strip() for c in row.strip("|").split("|")][2:] == ["40.0±10.0", "80.0±0.0"]


def test_bad_input(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: not a directory"
    assert main([str(tmp_path)]) == 2
    assert "no runs found" in capsys.readouterr().err
    run = make_run(tmp_path, "broken", vtab("dtd"), 50.0)
    (run / "retrain" / "metrics.json").write_text("{not json")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run / 'retrain' / 'metrics.json'}: cannot read") and "\n" not in err


def test_evaluations_table(tmp_path, capsys):
    """evaluate.py --out <run>/retrain/evaluate.json files become a table: a column per folder (its name)
    or split, mean±std over the seeds of a (data, method) row; a malformed file is named."""
    for seed, (a, r) in enumerate(((20.0, 30.0), (24.0, 34.0))):
        run = make_run(tmp_path, f"imagenet-{seed}", {"kind": "fewshot", "dataset": "imagenet", "shots": 16, "seed": seed}, 70.0)
        (run / "retrain" / "evaluate.json").write_text(json.dumps([
            {"checkpoint": "m", "folder": "/data/imagenet-a", "top1": a, "n": 7500},
            {"checkpoint": "m", "folder": "/data/imagenet-r/", "top1": r, "n": 30000}]))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| data | method | imagenet-a | imagenet-r |" in out
    assert "| imagenet 16-shot | glora large <=290,000 | 22.0±2.8 | 32.0±2.8 |" in out
    (tmp_path / "imagenet-0" / "retrain" / "evaluate.json").write_text('{"top1": 3}')
    assert main([str(tmp_path)]) == 2
    assert "evaluate.json: expected evaluate.py's --out list of results" in capsys.readouterr().err
