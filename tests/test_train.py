"""Stage 1 machinery on a tiny ViT: outputs, exact resume, NaN stop, RNG round trip, reference evals."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine import distributed as dist
from engine.config import config_from_dict
from engine.rng import get_rng_state, set_rng_state
from engine.recipes.train import run_train
from engine.trainer import TrainError
from runcfg import tiny_config, trainer_hooks

INFO = dist.DistInfo()


def _train(out, source="test.yaml", stop_at=None, fail_at=None, **sections):
    cfg = config_from_dict(tiny_config(out, **sections))
    with trainer_hooks(stop_at_step=stop_at, fail_at_step=fail_at):
        return run_train(cfg, INFO, source)


def _losses(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["subnet_tag"]) for r in rows if r["kind"] == "train"]


def test_outputs(tmp_path):
    out = tmp_path / "run"
    assert _train(out) == "done"
    for name in ["config.yaml", "supernet.safetensors", "supernet.yaml", "checkpoints/last.pt", "metrics.jsonl"]:
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    tensors = load_file(out / "supernet.safetensors")
    assert tensors and all("glora_" in k or k.startswith("head.") for k in tensors)  # never the frozen backbone
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert len(evals) == 2 and {"acc_largest", "acc_smallest", "acc_random0"} <= set(evals[0])
    steps = _losses(out)
    assert [s for s, _, _ in steps] == list(range(1, 7))  # 48 images / 16 = 3 steps x 2 epochs
    assert len({tag for _, _, tag in steps}) > 1  # a different sub-network per step
    ckpt = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["epoch"] == 2 and "rng" in ckpt and "optimizer" in ckpt


@pytest.mark.parametrize("stop_at", [2, 3, 4])  # mid-epoch, epoch boundary, mid-epoch of the second epoch
def test_stop_and_resume_is_exact(tmp_path, stop_at):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(full) == "done"
    assert _train(part, stop_at=stop_at) == "SIGTERM"
    assert not (part / "supernet.safetensors").exists()
    ckpt = torch.load(part / "checkpoints/last.pt", weights_only=True)
    assert ckpt["step"] == stop_at
    assert _train(part) == "done"
    assert _losses(part) == _losses(full)  # same per-step losses and sampled sub-networks
    a, b = load_file(full / "supernet.safetensors"), load_file(part / "supernet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_naming_step_and_writes_nothing_after(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="non-finite loss at step 4"):
        _train(out, fail_at=4)
    ckpt = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert ckpt["step"] == 3  # the end of epoch 1, the last good checkpoint
    assert not (out / "supernet.safetensors").exists()


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


def test_refuses_output_dir_of_another_config(tmp_path):
    from engine.config import ConfigError

    out = tmp_path / "run"
    _train(out)
    with pytest.raises(ConfigError, match=r"different configuration \(train\.lr\)"):
        _train(out, train={"lr": 0.5})
    assert _train(out) == "done"  # the same config is fine (it resumes the finished run)


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    """A checkpoint written by one process, resumed as one of two ranks: each rank's shard, the steps
    per epoch (the LR schedule) and the step-seeded sub-networks would all differ from the stopped
    run, which would go on silently as another run; it is refused, naming both counts."""
    out = tmp_path / "run"
    assert _train(out, stop_at=2) == "SIGTERM"
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["world_size"] == 1
    cfg = config_from_dict(tiny_config(out))
    with pytest.raises(TrainError, match=r"last\.pt: written by a run of 1 process\(es\), resumed with 2; resume with 1"):
        run_train(cfg, dist.DistInfo(rank=0, world_size=2), "test.yaml")
    assert _train(out) == "done"  # the same number of processes resumes


def _other_rank(monkeypatch, value):
    """Make this process look like rank 0 of 2 whose peer passed ``value`` to same_on_all_ranks."""
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t + torch.tensor([float(value), float(value) ** 2], dtype=t.dtype))


@pytest.mark.parametrize("peer,agree", [(5, True), (4, False), (-1, False)])
def test_same_on_all_ranks(monkeypatch, peer, agree):
    _other_rank(monkeypatch, peer)
    assert dist.same_on_all_ranks(5, torch.device("cpu")) is agree


@pytest.mark.parametrize("peer", [-1, 1])  # the peer found no checkpoint / another (older) one
def test_ranks_resuming_from_different_checkpoints_stop(tmp_path, monkeypatch, peer):
    """Several nodes each reading output_dir through their own disk: one rank resumes from step 2,
    another from nothing (or from a stale copy) and they would train different runs in lockstep;
    the resume stops on every rank instead, saying why."""
    out = tmp_path / "run"
    assert _train(out, stop_at=2) == "SIGTERM"
    _other_rank(monkeypatch, peer)
    with pytest.raises(TrainError, match=r"last\.pt: the ranks do not resume from the same checkpoint \(rank 0 found step 2\); "
                                         r"under torchrun on several nodes, output_dir must be on a filesystem every node shares"):
        _train(out)


def test_fp16_on_a_cpu_is_warned_about(tmp_path, capsys):
    assert _train(tmp_path / "a", train={"precision": "fp16", "epochs": 1}) == "done"
    assert "warning: train.precision: fp16 on a CPU usually runs far slower than fp32" in capsys.readouterr().err
    assert _train(tmp_path / "b", train={"precision": "bf16", "epochs": 1}) == "done"
    assert "warning" not in capsys.readouterr().err


def test_training_afresh_removes_the_previous_supernet_first(tmp_path):
    """--overwrite (or no checkpoint): a run stopped before its end must not leave search.py the
    earlier run's supernet.safetensors to search."""
    out = tmp_path / "run"
    assert _train(out) == "done" and (out / "supernet.safetensors").is_file()
    cfg = config_from_dict(tiny_config(out, train={"lr": 0.5}))
    with trainer_hooks(stop_at_step=2):
        assert run_train(cfg, INFO, "test.yaml", overwrite=True) == "SIGTERM"
    assert not (out / "supernet.safetensors").exists() and not (out / "supernet.yaml").exists()


@pytest.mark.parametrize("micro", [5, 16])
def test_micro_batches_give_the_same_gradients(tmp_path, micro):
    """train.micro_batch_size runs a batch of 16 in parts (5+5+5+1, or whole) and weights each part's
    loss by its share: the gradients handed to the optimizer are the whole batch's (compared before
    the step, since AdamW's update hides a uniform gradient scale that clipping would not)."""
    from engine.config import TrainConfig
    from engine.tracker import Tracker
    from engine.trainer import Trainer

    grads = {}
    for name, parts in (("whole", None), ("split", micro)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
        data = torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,)))
        cfg = TrainConfig(epochs=1, batch_size=16, micro_batch_size=parts, label_smoothing=0.1, warmup_epochs=0)
        trainer = Trainer(model, data, None, cfg, tmp_path / name, INFO, Tracker(tmp_path / name, enabled=False))
        trainer.scaler.step = lambda opt, _name=name: grads.setdefault(_name, [p.grad.clone() for p in model.parameters()])
        x, y = next(iter(trainer.loader))
        trainer.train_step(x, y)
    for a, b in zip(grads["whole"], grads["split"], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_micro_batches_give_the_same_run(tmp_path):
    """A whole run with parts of 5 (and resumed with parts of 3: the key is not part of the run's
    identity) logs the unsplit run's losses, up to float summation order. Without drop-path: its
    random masks are drawn part by part, so with it the run is alike in distribution only."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    model = {**tiny_config(whole)["model"], "drop_path_rate": 0.0}
    assert _train(whole, model=model) == "done"
    assert _train(split, model=model, stop_at=2, train={"micro_batch_size": 5}) == "SIGTERM"
    assert _train(split, model=model, train={"micro_batch_size": 3}) == "done"
    for (s1, l1, t1), (s2, l2, t2) in zip(_losses(whole), _losses(split), strict=True):
        assert (s1, t1) == (s2, t2) and l1 == pytest.approx(l2, rel=1e-3)  # AdamW magnifies round-off in near-zero gradients


def test_grad_checkpointing_trains_the_same_run_bit_for_bit(tmp_path, monkeypatch):
    """train.grad_checkpointing recomputes each block in the backward pass (timm's checkpointing, the
    RNG state preserved, so drop-path masks repeat): the same losses and supernet, exactly; and a
    model without timm's setter is refused by name."""
    import timm.models.vision_transformer as vit

    from engine.models import ModelError, set_grad_checkpointing

    calls = []
    real = vit.checkpoint_seq
    monkeypatch.setattr(vit, "checkpoint_seq", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert _train(plain) == "done" and not calls
    assert _train(ckpt, train={"grad_checkpointing": True}) == "done"
    assert len(calls) >= 6  # every training step went through timm's checkpointed blocks
    assert _losses(plain) == _losses(ckpt)
    a, b = load_file(plain / "supernet.safetensors"), load_file(ckpt / "supernet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ModelError, match=r"^retrain\.grad_checkpointing: Sequential has no set_grad_checkpointing"):
        set_grad_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), "retrain.grad_checkpointing")


def test_frozen_batch_norms_keep_their_statistics():
    """A frozen backbone's batch norms stay in eval mode while adapters and head train (their running
    statistics are not in the adapter files or the merge), through evaluate() too; trainable ones train."""
    import torch.nn as nn

    from engine.trainer import evaluate, train_mode

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    model[1].requires_grad_(False)
    before = model[1].running_mean.clone()
    train_mode(model)
    assert model.training and model[0].training and not model[1].training
    model(torch.randn(4, 3, 8, 8) + 5)
    assert torch.equal(model[1].running_mean, before)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    evaluate(model, torch.utils.data.DataLoader(data, batch_size=2), INFO)
    assert model.training and not model[1].training
    model[1].requires_grad_(True)
    train_mode(model)
    assert model[1].training
    model(torch.randn(4, 3, 8, 8) + 5)
    assert not torch.equal(model[1].running_mean, before)
