"""How hard is the embedded demo task? Re-runnable measurement (CPU, no downloads).

Reports, on the demo *test* split (phase "final": fit on train+val, evaluate on test):
  * chance level;
  * a logistic-regression probe on global colour statistics (per-channel mean/std and a
    coarse colour histogram) - should be near chance: the label is not in global stats;
  * a logistic-regression probe on the frozen, randomly initialised tiny ViT
    (CLS token and mean-pooled patch tokens) - should be well below the trained model;
  * a small CNN and the same tiny ViT trained end-to-end (AdamW, lr 1e-3, batch 64) for a
    fixed number of epochs (fixed epochs rather than a time budget keep the numbers
    reproducible on a busy machine; the wall time is printed).

Usage:  .venv/bin/python tests/tools/measure_demo.py [--cnn-epochs 30] [--vit-epochs 15]
                                                     [--seed 0] [--threads 2]
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


def small_cnn(num_classes: int, width: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)

    def block(c_in: int) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(c_in, width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]

    # Flatten (not global pooling) keeps where things are, which the relation depends on.
    return torch.nn.Sequential(*block(3), *block(width), *block(width), torch.nn.Flatten(),
                               torch.nn.Linear(width * (IMG_SIZE // 8) ** 2, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, num_classes))


def train_end_to_end(model: torch.nn.Module, x_tr, y_tr, x_te, y_te, epochs: int
                     ) -> tuple[float, float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in x_te.split(200)])
    return float((pred == y_te).float().mean()), time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cnn-epochs", type=int, default=30)
    ap.add_argument("--vit-epochs", type=int, default=15)
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
    acc, secs = train_end_to_end(small_cnn(k), x_tr, y_tr, x_te, y_te, args.cnn_epochs)
    print(f"small CNN trained end-to-end   : {acc:.3f}  ({args.cnn_epochs} epochs, {secs:.0f}s)")
    vit = tiny_vit()
    vit.reset_classifier(k)
    acc, secs = train_end_to_end(vit, x_tr, y_tr, x_te, y_te, args.vit_epochs)
    print(f"tiny ViT trained end-to-end    : {acc:.3f}  ({args.vit_epochs} epochs, {secs:.0f}s)")


if __name__ == "__main__":
    main()
