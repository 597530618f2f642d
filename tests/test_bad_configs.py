"""A corpus of broken run configs: each exits with status 2, one clear message naming the file and
the key, no traceback, and nothing created in output_dir."""

import subprocess
import sys

import pytest

from conftest import ROOT
from engine.cli import main

CORPUS = sorted((ROOT / "tests" / "bad_configs").glob("*.yaml"))


def _expected(path):
    first = path.read_text().splitlines()[:1]
    if first and first[0].startswith("# expect: "):
        return first[0].removeprefix("# expect: ")
    return "empty file"  # empty.yaml has no room for a comment


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
@pytest.mark.parametrize("stage", ["train"])
def test_bad_config(path, stage, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the corpus uses repository-relative paths, as users' configs do
    out = tmp_path / "out"
    code = main(stage, ["--config", str(path), "--set", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err  # one problem, one line
    assert lines[0].startswith(f"error: {path}: ")
    assert _expected(path) in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_directory_instead_of_file(tmp_path, capsys):
    assert main("train", ["--config", str(tmp_path)]) == 2
    assert f"error: {tmp_path}: is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train.py", "search.py", "retrain.py"])
def test_real_cli_exit_status(script, tmp_path):
    path = ROOT / "tests" / "bad_configs" / "train_lr_word.yaml"
    proc = subprocess.run([sys.executable, str(ROOT / script), "--config", str(path), "--set", f"output_dir={tmp_path}/o"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "train.lr: expected a number, got 'fast'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage,key", [("train", "train.device"), ("search", "search.device"), ("retrain", "retrain.device")])
@pytest.mark.parametrize("cuda_devices,local_rank,needle", [
    (0, "0", "cuda was asked for but torch sees no CUDA device"),
    (2, "2", "LOCAL_RANK 2 but 2 CUDA devices are visible"),  # torchrun started more processes than GPUs
])
def test_absent_cuda_device(stage, key, cuda_devices, local_rank, needle, tmp_path, capsys, monkeypatch):
    """device: cuda where there is none (or fewer than torchrun's processes): one line naming the
    stage's device key, exit status 2, nothing written (it was a traceback)."""
    import torch

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    out = tmp_path / "out"
    path = ROOT / "configs" / "demo.yaml"
    code = main(stage, ["--config", str(path), "--set", f"output_dir={out}", "--set", f"{key}=cuda"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {key}: ") and needle in lines[0], err
    assert not out.exists()


def test_one_visible_gpu_per_process_is_used_whatever_the_local_rank(monkeypatch):
    """Launchers that bind each process to its own GPU (CUDA_VISIBLE_DEVICES) leave one device
    visible while LOCAL_RANK counts up: that device is used, not an invalid ordinal."""
    import torch

    from engine import distributed as dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist.setup("cuda").device == torch.device("cuda", 0)
