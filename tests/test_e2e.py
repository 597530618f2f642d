"""The three real CLIs in sequence as subprocesses, TensorBoard events read back with tensorboard's reader."""

import json
import subprocess
import sys

import pytest
import timm
from safetensors.torch import load_file

from conftest import ROOT
from runcfg import run_cli as _run, write_config

pytestmark = pytest.mark.slow


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_search_retrain_cli(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", out)
    _run("train.py", cfg)
    tb = _scalars(out / "tb")
    assert len(tb["train/loss"]) == 6 and all(v > 0 for v in tb["train/loss"])
    assert {"train/lr", "train/images_per_sec", "eval/acc_largest", "eval/acc_smallest"} <= set(tb)
    _run("search.py", cfg, "--set", "search.max_params=12000")
    stb = _scalars(out / "search" / "tb")
    assert len(stb["search/best_accuracy"]) == 3 and stb["search/best_accuracy"] == sorted(stb["search/best_accuracy"])
    _run("retrain.py", cfg)
    metrics = json.loads((out / "retrain" / "metrics.json").read_text())
    assert metrics["adapter_params"] <= 12000 and metrics["test_images"] == 24
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=4)
    model.load_state_dict(load_file(out / "retrain" / "merged.safetensors"), strict=True)
    proc = _run("evaluate.py", cfg, "--checkpoint", str(out / "retrain" / "merged.safetensors"), "--split", "test")
    scored = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(scored["top1"] - metrics["test_top1"]) < 1e-9
    # The same test images as class folders, scored with no config at all: the checkpoint's metadata
    # gives the model, input size and normalisation, so the accuracy is retrain's.
    from PIL import Image

    from engine.demo_data import make_demo_arrays

    images, labels = make_demo_arrays(0, "test", 24, 4)
    for i, (image, label) in enumerate(zip(images, labels)):
        (tmp_path / "folders" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "folders" / str(label) / f"{i}.png")
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(out / "retrain" / "merged.safetensors"),
                           "--folder", str(tmp_path / "folders")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["top1"] == metrics["test_top1"]
    proc = subprocess.run([sys.executable, "-m", "engine.report", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    row = f"| {out} | demo seed 0 | glora large <=12,000 | {metrics['adapter_params']:,} | {metrics['test_top1']:.2f} |"
    assert row in proc.stdout, proc.stdout
