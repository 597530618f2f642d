"""Every registered method through retrain.py's recipe on the tiny ViT: its count in metrics.json,
its export (merged into the plain timm model, or adapted.safetensors that evaluate.py scores as the
retrain did), exact resumption, and torchrun with 2 processes against one (slow)."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import methods
from engine import distributed as dist
from engine.config import config_from_dict
from engine.recipes.retrain import run_retrain
from runcfg import tiny_config, torchrun_retrain, trainer_hooks, write_config
from supernet import load_merged

INFO = dist.DistInfo()
PRESETS = [(name, methods.get(name).test_sizes[0] if methods.get(name).size else 8) for name in methods.PRESETS]


def _cfg(out, name, size, **retrain):
    return config_from_dict(tiny_config(out, retrain={"preset": name, "rank": size, **retrain}))


def _exported(out):
    rdir = out / "retrain"
    return load_file(rdir / ("merged.safetensors" if (rdir / "merged.safetensors").exists() else "adapted.safetensors"))


@pytest.mark.parametrize("name,size", PRESETS)
def test_retrain_counts_exports_and_evaluates(tmp_path, name, size, capsys):
    out = tmp_path / name
    assert run_retrain(_cfg(out, name, size), INFO, "t.yaml") == "done"
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    method = methods.get(name)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=4)
    head = sum(p.numel() for p in base.head.parameters())
    assert m["method"] == name and m["head_params"] == head
    assert m["trainable_params"] == m["adapter_params"] + head
    if method.mergeable:
        assert m["exported"] == "merged.safetensors" and not (out / "retrain" / "adapted.safetensors").exists()
        load_merged(base, out / "retrain" / "merged.safetensors")  # the plain architecture, strictly
    else:
        assert m["exported"] == "adapted.safetensors" and not (out / "retrain" / "merged.safetensors").exists()
        assert m["model_params"] > sum(p.numel() for p in base.parameters()) and m["inference_forward_ratio"] > 0
    from engine.evaluate import main as evaluate

    cfg_path = write_config(tmp_path / "c.yaml", out, retrain={"preset": name, "rank": size})
    capsys.readouterr()
    assert evaluate(argv=["--config", str(cfg_path), "--checkpoint", str(out / "retrain" / m["exported"])]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == pytest.approx(m["test_top1"])
    if not method.mergeable:  # from the file alone, as evaluate.py --folder does without a config
        from methods.export import create_adapted_model

        assert sum(p.numel() for p in create_adapted_model(out / "retrain" / m["exported"]).parameters()) == m["model_params"]


@pytest.mark.parametrize("name,size", PRESETS)
def test_an_interrupted_retrain_resumes_to_the_same_tensors(tmp_path, name, size):
    assert run_retrain(_cfg(tmp_path / "a", name, size, epochs=2), INFO, "t.yaml") == "done"
    cfg = _cfg(tmp_path / "b", name, size, epochs=2)
    with trainer_hooks(stop_at_step=3):
        assert run_retrain(cfg, INFO, "t.yaml") == "SIGTERM"
    assert run_retrain(cfg, INFO, "t.yaml") == "done"
    a, b = _exported(tmp_path / "a"), _exported(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_two_processes_retrain_as_one(tmp_path):
    """Two ranks with batches of 16 take, step by step, the halves of one process's batches of 32 (the
    same permutation, interleaved), and the averaged gradient is that batch's: every method's exported
    model matches (drop path and the methods' dropout off: their masks are drawn per rank). One torchrun
    retrains them all."""
    configs = []
    for name, size in PRESETS:
        args = {"dropout": 0.0} if "dropout" in methods.get(name).arg_names() else {}
        sections = {"retrain": {"preset": name, "rank": size, "method_args": args}, "model": {"drop_path_rate": 0.0}}
        configs.append(str(write_config(tmp_path / f"{name}.yaml", tmp_path / "two" / name, **sections)))
        one = tiny_config(tmp_path / "one" / name, **{**sections, "retrain": {**sections["retrain"], "batch_size": 32}})
        assert run_retrain(config_from_dict(one), INFO, "t.yaml") == "done"
    assert torchrun_retrain(configs, tmp_path / "dump") == ["done"] * len(PRESETS)
    # The trained tensors (the last checkpoint's: a merge would spread a difference over whole weights).
    # AdamW divides by each gradient's running magnitude, so where a gradient is tiny the rounding order
    # of the two-rank sum shows: measured up to 5e-5 (bitfit, full); ranks out of step differ by ~lr.
    for name, _ in PRESETS:
        a, b = (torch.load(tmp_path / run / name / "retrain" / "checkpoints" / "last.pt", weights_only=True)["model"]
                for run in ("one", "two"))
        assert a.keys() == b.keys(), name
        diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
        assert diff.max() <= 1e-4, (name, diff.max().item())
