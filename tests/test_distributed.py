"""Two gloo processes on CPU under torchrun: same sub-networks, identical tensors, same search result."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from runcfg import write_config

pytestmark = pytest.mark.slow


def _torchrun(args, tmp_path, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def test_two_ranks_train_identically_and_search_matches_single_process(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", out)
    dump = tmp_path / "dump"
    dump.mkdir()
    proc = _torchrun([str(ROOT / "tests" / "dist_worker.py"), "train", str(cfg), str(dump)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((dump / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["status"] == r1["status"] == "done"
    assert r0["tags"] == r1["tags"] and len(r0["tags"]) == 4  # 48 images / (16 x 2 ranks) = 2 steps x 2 epochs
    s0, s1 = (torch.load(dump / f"rank{i}.pt", weights_only=True) for i in range(2))
    idx0, idx1 = s0.pop("__epochs_indices__"), s1.pop("__epochs_indices__")
    assert set(idx0.tolist()).isdisjoint(idx1.tolist())  # each rank sees its own shard
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)

    # the search: 2 ranks split the candidates; the result equals a single-process search
    proc = _torchrun([str(ROOT / "search.py"), "--config", str(cfg)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = yaml.safe_load((out / "search" / "result.yaml").read_text())
    hist_two = (out / "search" / "history.jsonl").read_text()
    single = subprocess.run([sys.executable, str(ROOT / "search.py"), "--config", str(cfg), "--overwrite"],
                            capture_output=True, text=True, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    one = yaml.safe_load((out / "search" / "result.yaml").read_text())
    assert one == two
    assert (out / "search" / "history.jsonl").read_text() == hist_two


def test_sweep_under_torchrun_keeps_one_process_group(tmp_path):
    """engine.sweep runs several stages in one process: under torchrun the group is created once and
    kept (torch cannot join a destroyed gloo group again), and rank 0 alone prints the report."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "runs")
    proc = _torchrun(["-m", "engine.sweep", "--config", str(cfg), "--grid", "retrain.seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in ("0", "1"):
        assert (tmp_path / "runs" / seed / "retrain" / "merged.safetensors").is_file()
    assert proc.stdout.count(f"| {tmp_path / 'runs' / '1'} | demo seed 1 |") == 1
