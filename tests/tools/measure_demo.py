"""How hard is the embedded demo task? Re-runnable measurement (CPU, no downloads).

Reports, on the demo *test* split (phase "final": fit on train+val, evaluate on test):
  * chance level;
  * a logistic-regression probe on global colour statistics (per-channel mean/std and a
    coarse colour histogram) - should be near chance: the label is not in global stats;
  * a logistic-regression probe on the frozen, randomly initialised tiny ViT
    (CLS token and mean-pooled patch tokens) - should be well below the trained model;
  * the same tiny ViT trained end-to-end (AdamW, lr 1e-3) for a fixed wall-clock budget.

Usage:  .venv/bin/python tests/tools/measure_demo.py [--seconds 90] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import timm
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from engine.data import DataConfig, build_splits  # noqa: E402

IMG_SIZE = 32


def stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG_SIZE,
                             patch_size=4, depth=2, num_classes=0)


def probe(train_feats: np.ndarray, y_train: np.ndarray, test_feats: np.ndarray,
          y_test: np.ndarray) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
    clf.fit(train_feats, y_train)
    return float((clf.predict(test_feats) == y_test).mean())


def colour_stats(x: torch.Tensor) -> np.ndarray:
    flat = x.flatten(2)
    hist = [torch.histc(img, bins=8, min=-2.2, max=2.7) for img in x.flatten(1)]
    return torch.cat([flat.mean(-1), flat.std(-1), torch.stack(hist) / flat[0].numel()],
                     1).numpy()


@torch.no_grad()
def frozen_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    tokens = torch.cat([model.forward_features(b) for b in x.split(200)])
    cls = tokens[:, 0]
    mean = tokens[:, model.num_prefix_tokens:].mean(1)
    return cls.numpy(), mean.numpy()


def train_end_to_end(x_tr, y_tr, x_te, y_te, num_classes: int, seconds: float) -> tuple[float, int]:
    model = tiny_vit()
    model.reset_classifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    start, epochs = time.time(), 0
    while time.time() - start < seconds:
        model.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in x_te.split(200)])
    return float((pred == y_te).float().mean()), epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90.0, help="end-to-end training budget")
    ap.add_argument("--seed", type=int, default=0, help="demo generation seed")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.time()
    train_ds, test_ds, k = build_splits(DataConfig(kind="demo", seed=args.seed), "final", IMG_SIZE)
    print(f"built demo splits in {time.time() - t0:.2f}s: train {len(train_ds)}, "
          f"test {len(test_ds)}, {k} classes")
    x_tr, y_tr = stack(train_ds)
    x_te, y_te = stack(test_ds)

    print(f"chance                         : {1 / k:.3f}")
    print(f"colour-stats linear probe      : "
          f"{probe(colour_stats(x_tr), y_tr.numpy(), colour_stats(x_te), y_te.numpy()):.3f}")
    print(f"raw-pixel linear probe         : "
          f"{probe(x_tr.flatten(1).numpy(), y_tr.numpy(), x_te.flatten(1).numpy(), y_te.numpy()):.3f}")
    frozen = tiny_vit()
    (cls_tr, mean_tr), (cls_te, mean_te) = frozen_features(frozen, x_tr), frozen_features(frozen, x_te)
    print(f"frozen random ViT probe (CLS)  : {probe(cls_tr, y_tr.numpy(), cls_te, y_te.numpy()):.3f}")
    print(f"frozen random ViT probe (mean) : {probe(mean_tr, y_tr.numpy(), mean_te, y_te.numpy()):.3f}")
    acc, epochs = train_end_to_end(x_tr, y_tr, x_te, y_te, k, args.seconds)
    print(f"tiny ViT trained end-to-end    : {acc:.3f}  ({epochs} epochs, {args.seconds:.0f}s budget)")


if __name__ == "__main__":
    main()
