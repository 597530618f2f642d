"""Fold the biases a merge added into the batch norm that follows, so a merged CNN is the plain model.

C or E on a convolution built without a bias (every convolution followed by batch norm in timm's
CNNs) gives its merged form a bias the architecture does not have. Where that convolution's output
goes straight into a batch norm using its running statistics, the bias can move into the norm:

    BN(y + c) = γ (y + c - μ) / σ + β = γ (y - (μ - c)) / σ + β

so ``running_mean -= c`` and the bias goes. The merged state dict then has exactly the keys of an
untouched model and loads with ``load_state_dict(strict=True)`` into ``timm.create_model``. In train
mode a batch norm subtracts the batch mean, which cancels a constant per channel either way.

Which norm reads which layer's output is found by running one example batch with hooks (a norm whose
input is the very tensor a layer returned). A hook cannot see whether that output also goes somewhere
else, so the folded model is checked against the unfolded one on the same batch, and nothing is
folded unless the outputs agree.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn

FOLD_TOLERANCE = 1e-4  # x the largest output: fp32 round-off of the reordered sums


def _norm_readers(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> dict[str, str]:
    """``{layer: norm}`` for each layer in ``names`` whose output is the input of exactly one batch
    norm with running statistics, in ``model``'s forward on ``example``."""
    modules = dict(model.named_modules())
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is kept so its id is not reused
    readers: dict[str, list[str]] = {}
    hooks = []
    for name in names:
        hooks.append(modules[name].register_forward_hook(
            lambda m, args, out, name=name: produced.__setitem__(id(out), (name, out))))
    for name, m in modules.items():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            def read(m, args, name=name):
                hit = produced.get(id(args[0]))
                if hit is not None and hit[1] is args[0]:
                    readers.setdefault(hit[0], []).append(name)
            hooks.append(m.register_forward_pre_hook(read))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return {layer: norms[0] for layer, norms in readers.items() if len(norms) == 1}


@torch.no_grad()
def fold_biases_into_norms(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> list[str]:
    """Move the bias of each plain layer in ``names`` into the batch norm that reads its output (in
    place, ``model`` in eval mode); returns the layers folded, ``[]`` where none could be, or where the
    folded model's outputs on ``example`` would differ from the unfolded one's (then nothing changes)."""
    if not names:
        return []
    model.eval()
    pairs = _norm_readers(model, names, example)
    if not pairs:
        return []
    modules = dict(model.named_modules())
    before = model(example).float()
    saved = {layer: (copy.deepcopy(modules[layer].bias), modules[norm].running_mean.clone()) for layer, norm in pairs.items()}
    for layer, norm in pairs.items():
        conv, bn = modules[layer], modules[norm]
        bn.running_mean.sub_(conv.bias.to(bn.running_mean.dtype))
        conv.register_parameter("bias", None)
    after = model(example).float()
    if not torch.allclose(after, before, rtol=0, atol=FOLD_TOLERANCE * max(1.0, before.abs().max().item())):
        for layer, norm in pairs.items():
            bias, mean = saved[layer]
            modules[layer].register_parameter("bias", bias)
            modules[norm].running_mean.copy_(mean)
        return []
    return sorted(pairs)
