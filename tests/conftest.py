import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

LARGE_SPACE = ROOT / "configs" / "space" / "large.yaml"

# torch.compile on the CPU builds C++ kernels (retrain.compile, search.compile, bench --compile)
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="torch.compile on the CPU needs a C++ compiler"
)


def tiny_vit(num_classes: int = 5, **kw):
    import timm

    args = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=num_classes)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)


def assert_same_grads(y, want, w, inputs, names, label, tol: float = 1e-10) -> None:
    """The gradients of ``(y * w).sum()`` and ``(want * w).sum()`` with respect to ``inputs`` agree
    within ``tol`` (a gradient one side lacks counts as zero); ``names`` label them in the message."""
    got = torch.autograd.grad((y * w).sum(), inputs, allow_unused=True)
    exp = torch.autograd.grad((want * w).sum(), inputs, allow_unused=True)
    for name, g, e in zip(names, got, exp):
        g = torch.zeros_like(e) if g is None and e is not None else g
        e = torch.zeros_like(g) if e is None and g is not None else e
        if g is not None:
            assert (g - e).abs().max().item() <= tol, f"{label}: gradient of {name}"


@pytest.fixture
def one_thread():
    """One torch thread for the test (float64 comparisons whose summation order must not depend on threading)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return tiny_vit()


@pytest.fixture
def large_space():
    return LARGE_SPACE
