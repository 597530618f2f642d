"""Injected faults never lose work or corrupt a file (fast in-process part)."""

import errno
import json
import pickle

import pytest
import torch

from engine import distributed as dist
from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from engine.cli import main
from engine.config import config_from_dict
from engine.recipes.retrain import run_retrain
from engine.recipes.train import run_train
from runcfg import tiny_config, trainer_hooks, write_config
from supernet import MergeError, WriteError, glora_layers

INFO = dist.DistInfo()


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
    with pytest.raises(WriteError, match=r"last\.pt: cannot write: boom inside save; the file already under this name, if any, is intact"):
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


def test_full_disk_is_named_whatever_the_writer_raises(tmp_path, monkeypatch):
    """torch.save on a full disk raises only "unexpected pos ..." (RuntimeError), safetensors its own
    error type: with the device (nearly) full, the message says so; the file is untouched."""
    import shutil
    from collections import namedtuple

    path = tmp_path / "last.pt"
    save_checkpoint(_state(1), path)
    usage = namedtuple("usage", "total used free")

    def torch_on_full_disk(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", torch_on_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 4096))
    with pytest.raises(WriteError, match=r"last\.pt: cannot write: no space left on the device \(4,096 bytes free\)"):
        save_checkpoint(_state(2), path)
    assert load_checkpoint(path)["step"] == 1 and list(tmp_path.iterdir()) == [path]


def test_a_checkpoint_that_cannot_be_written_stops_the_cli_in_one_line(tmp_path, monkeypatch, capsys):
    """train.py when the end-of-epoch-2 checkpoint cannot be written: exit status 1, one line naming the
    file, and epoch 1's checkpoint still resumes."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run")
    real, calls = torch.save, []

    def fails_second_time(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("unexpected pos 576 vs 534")
        real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fails_second_time)
    assert main("train", ["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: {tmp_path / 'run' / 'checkpoints' / 'last.pt'}: cannot write"), errors
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(torch, "save", real)
    assert main("train", ["--config", str(cfg)]) == 0 and (tmp_path / "run" / "supernet.safetensors").is_file()


def test_leftover_temporary_file_is_ignored_on_resume(tmp_path):
    out = tmp_path / "run"
    with trainer_hooks(stop_at_step=2):
        assert run_train(config_from_dict(tiny_config(out)), INFO, "t.yaml") == "SIGTERM"
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
    import engine.recipes.retrain as st

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
