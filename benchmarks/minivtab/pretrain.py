"""Deterministic pre-training of the mini-VTAB backbone on Fashion-MNIST's 60k training images.

    python -m benchmarks.minivtab.pretrain [--epochs N]

The checkpoint is cached as ``cache/backbone-<hash>.safetensors`` where the hash covers the
settings, this file's source and the bytes of the training data, so a change to any of them
retrains and an unchanged setup reuses the file. It is loaded by the pipeline through
``model.checkpoint`` (the classifier is skipped there and reset for each task). Preprocessing
matches the pipeline's: grey replicated to RGB, ImageNet mean/std. CPU, 1 thread (on a shared
2-core machine 1 thread was ~10x faster than 2 in our measurement), fixed seeds: bit-identical
reruns on the same machine and torch build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import MODEL_KWARGS, MODEL_NAME, fmnist

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
SETTINGS = {"model": MODEL_NAME, "kwargs": MODEL_KWARGS, "epochs": 6, "batch_size": 128, "lr": 1e-3,
            "weight_decay": 0.05, "warmup_steps": 200, "seed": 0, "augment": "pad2-crop+hflip", "threads": 1}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def content_hash(settings: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(Path(__file__).read_bytes())
    for path in fmnist.files("train"):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 3, 28, 28], exactly what the pipeline's loader feeds the model."""
    x = x_uint8.float().div(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - MEAN) / STD


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=g)
    dy = torch.randint(0, 5, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def pretrain(settings: dict | None = None, log=print) -> Path:
    """Train (or reuse) the backbone; returns the .safetensors path."""
    import timm
    from safetensors.torch import save_file

    s = dict(SETTINGS, **(settings or {}))
    key = content_hash(s)
    out = CACHE / f"backbone-{key}.safetensors"
    meta_path = out.with_suffix(".json")
    if out.is_file() and meta_path.is_file():
        log(f"pretrain: cached backbone {out.name} ({json.loads(meta_path.read_text())['test_top1']:.2f}% on Fashion-MNIST test)")
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(s["threads"])
    torch.manual_seed(s["seed"])
    x_train, y_train = fmnist.load("train")
    x_test, y_test = fmnist.load("test")
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train)
    model = timm.create_model(s["model"], num_classes=10, drop_path_rate=0.0, **s["kwargs"])
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    steps_per_epoch = math.ceil(len(x_train) / s["batch_size"])
    total = steps_per_epoch * s["epochs"]

    def lr_at(step):
        if step < s["warmup_steps"]:
            return s["lr"] * (step + 1) / s["warmup_steps"]
        return 0.5 * s["lr"] * (1 + math.cos(math.pi * (step - s["warmup_steps"]) / (total - s["warmup_steps"])))

    g = torch.Generator().manual_seed(s["seed"])
    t0, step = time.time(), 0
    for epoch in range(s["epochs"]):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * s["batch_size"]:(b + 1) * s["batch_size"]]
            x = normalise(_augment(x_train[idx], g))
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            step += 1
        log(f"pretrain: epoch {epoch + 1}/{s['epochs']} loss {running / steps_per_epoch:.4f} "
            f"({time.time() - t0:.0f}s)")
    model.eval()
    correct = 0
    with torch.no_grad():
        for b in range(0, len(x_test), 500):
            xb = normalise(torch.from_numpy(x_test[b:b + 500]))
            correct += int((model(xb).argmax(1) == torch.from_numpy(y_test[b:b + 500])).sum())
    acc = 100.0 * correct / len(x_test)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"model": s["model"], "kwargs": json.dumps(s["kwargs"]), "hash": key})
    meta = {"hash": key, "settings": s, "test_top1": acc, "wall_time_s": round(time.time() - t0, 1),
            "params": sum(v.numel() for v in state.values()), "torch": torch.__version__}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out)
    log(f"pretrain: {acc:.2f}% on Fashion-MNIST test, {meta['wall_time_s']}s -> {out}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.minivtab.pretrain")
    p.add_argument("--epochs", type=int, default=SETTINGS["epochs"])
    args = p.parse_args(argv)
    try:
        pretrain({"epochs": args.epochs})
    except fmnist.FashionMNISTMissing as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
