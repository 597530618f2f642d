"""engine.sweep: every combination of --grid values through the stages, failures recorded, one report."""

import pytest
import yaml

from engine.sweep import NAMED_VALUES, main, parse_grid
from runcfg import write_config


def test_grid_parsing():
    assert parse_grid(["data.seed=0,1", "data.task=@vtab1k"]) == [("data.seed", ["0", "1"]), ("data.task", NAMED_VALUES["@vtab1k"])]
    assert len(NAMED_VALUES["@vtab1k"]) == 19
    for bad in ("data.seed", "data.seed=", "data.task=@vtab"):
        with pytest.raises(ValueError, match="--grid"):
            parse_grid([bad])


def test_sweep_runs_each_combination_and_goes_on_past_a_failure(tmp_path, capsys):
    """Two seeds of the demo task, and a demo class count the data refuses when it is built: the good
    runs finish and are tabulated, the bad one is named, exit status 1; a rerun skips the finished runs."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "runs")
    argv = ["--config", str(cfg), "--grid", "data.demo_classes=4,9", "--grid", "retrain.seed=0,1"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "[sweep] 2 of 4 combinations failed: 9-0 (train.py exited with 2); 9-1 (train.py exited with 2)" in captured.err
    for name in ("4-0", "4-1"):
        assert (tmp_path / "runs" / name / "retrain" / "metrics.json").is_file()
        assert yaml.safe_load((tmp_path / "runs" / name / "retrain" / "config.yaml").read_text())["data"]["demo_classes"] == 4
    assert f"| {tmp_path / 'runs' / '4-1'} | demo seed 1 |" in captured.out
    assert main(["--config", str(cfg), "--grid", "data.demo_classes=4", "--grid", "retrain.seed=0,1"]) == 0
    assert "resumed" in capsys.readouterr().err


def test_a_combination_whose_config_is_invalid_stops_the_sweep_before_it_starts(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "runs")
    assert main(["--config", str(cfg), "--grid", "retrain.lr=0.01,-1", "--grid", "train.epochs=1,0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: [") for line in err), err  # (0.01, 1) is valid
    assert "[0.01-0]" in err[0] and "train.epochs" in err[0] and "[-1-1]" in err[1] and "retrain.lr" in err[1]
    assert "[-1-0]" in err[2] and "[-1-0]" in err[3]
    assert not (tmp_path / "runs").exists()


def test_retraining_seeds_share_one_supernet_and_search(tmp_path, capsys):
    """The papers' protocol: supernet and search once, then more retraining seeds of that result
    (--stages retrain, retrain.subnet and retrain.supernet pointing at the first run through {key}
    placeholders). The seed runs train no supernet of their own and report under the same method."""
    import json

    from engine.report import main as report

    cfg = write_config(tmp_path / "c.yaml", tmp_path / "runs")
    assert main(["--config", str(cfg), "--grid", "data.demo_classes=4"]) == 0
    first = tmp_path / "runs" / "4"
    assert main(["--config", str(cfg), "--grid", "data.demo_classes=4", "--grid", "retrain.seed=1,2", "--stages", "retrain",
                 "--set", f"retrain.subnet={tmp_path / 'runs'}/{{data.demo_classes}}/search/result.yaml",
                 "--set", f"retrain.supernet={tmp_path / 'runs'}/{{data.demo_classes}}/supernet.safetensors"]) == 0
    for seed in ("1", "2"):
        run = tmp_path / "runs" / f"4-{seed}"
        assert (run / "retrain" / "merged.safetensors").is_file() and not (run / "supernet.safetensors").exists()
        assert json.loads((run / "retrain" / "metrics.json").read_text())["subnet"] == str(first / "search" / "result.yaml")
    capsys.readouterr()
    assert report([str(tmp_path / "runs"), "--json", str(tmp_path / "r.json")]) == 0
    assert {r["method"] for r in json.loads((tmp_path / "r.json").read_text())["runs"]} == {"glora large"}
