"""mini-VTAB: a CPU-scale replica of the GLoRA paper's evaluation protocol (docs/method.md §7) on
real images available offline (Fashion-MNIST from the Debian package, scikit-learn's digits).

    python -m benchmarks.minivtab --quick     # < 15 min on 2 CPU cores
    python -m benchmarks.minivtab             # the full run, < 3 h on 2 CPU cores

Steps: ``pretrain`` (a tiny ViT on Fashion-MNIST's 60k training images, cached by content hash),
``prepare`` (task folders in the VTAB-1k and few-shot list layouts, PNG files), ``run`` (every task x
method x seed through train.py/search.py/retrain.py's stage functions), ``report`` (table + plot).
"""

MODEL_NAME = "vit_tiny_patch16_224"
# 28 px Fashion-MNIST-sized inputs, 7 px patches (16 tokens + class token): the measured CPU cost
# of 4 px patches (49 tokens) was ~3x higher, which the 3 h budget does not allow.
MODEL_KWARGS = {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 4, "num_heads": 3}
