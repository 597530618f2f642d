"""Injected faults never lose work or corrupt a file (fast in-process part)."""

import errno
import json
import pickle

import pytest
import torch

from engine import distributed as D
from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from engine.cli import main
from engine.config import config_from_dict
from engine.stages import run_retrain, run_train
from runcfg import tiny_config, write_config
from supernet import MergeError, glora_layers

INFO = D.DistInfo()


def _state(v):
    return {"step": v, "model": {"w": torch.full((3,), float(v))}}


def test_exception_inside_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(_state(1), path)
    before = path.read_bytes()

    def broken(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("boom inside save")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(_state(2), path)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert list(path.parent.iterdir()) == [path]  # the temporary file was removed


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(1), path)
    before = path.read_bytes()
    real = torch.save

    def disk_full(obj, f, *a, **k):
        real(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_state(2), path)
    assert path.read_bytes() == before


def test_leftover_temporary_file_is_ignored_on_resume(tmp_path):
    out = tmp_path / "run"
    assert run_train(config_from_dict(tiny_config(out, train={"stop_at_step": 2})), INFO, "t.yaml") == "SIGTERM"
    (out / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert run_train(config_from_dict(tiny_config(out)), INFO, "t.yaml") == "done"
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 6


class Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickled_custom_object_in_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    with open(out / "checkpoints" / "last.pt", "wb") as fh:
        pickle.dump({"step": 1, "model": Payload()}, fh)
    with pytest.raises(CheckpointError, match=r"last\.pt: refused or unreadable with weights_only=True"):
        load_checkpoint(out / "checkpoints" / "last.pt")
    cfg = write_config(tmp_path / "c.yaml", out)
    assert main("train", ["--config", str(cfg)]) == 2
    assert "last.pt: refused or unreadable" in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content,needle", [(b"", "empty checkpoint"), (b"PK\x03\x04truncated", "refused or unreadable")])
def test_truncated_or_empty_checkpoint(tmp_path, content, needle):
    (tmp_path / "last.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(tmp_path / "last.pt")


def test_inf_adapter_blocks_merged_export(tmp_path, monkeypatch):
    import engine.stages as st

    real = st.export

    def poisoned(model, *args):
        with torch.no_grad():
            next(iter(glora_layers(model)))[1].glora_Bd.fill_(float("inf"))
        return real(model, *args)

    monkeypatch.setattr(st, "export", poisoned)
    with pytest.raises(MergeError, match="not finite"):
        run_retrain(config_from_dict(tiny_config(tmp_path / "run", retrain={"preset": "lora"})), INFO, "t.yaml")
    assert not (tmp_path / "run" / "retrain" / "merged.safetensors").exists()
    assert not (tmp_path / "run" / "retrain" / "metrics.json").exists()
