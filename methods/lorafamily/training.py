"""The LoRA family's options that act on training rather than on the layers: LoRA+'s learning rates
and LoRA-Pro's gradients, as :class:`methods.hooks.TrainingHooks` over a model's GLoRA layers.

Both act on the *active* low-rank paths: in a supernet each step trains one sub-network, whose
``lora_k`` choice of A, B or C is the leading slice ``Xd[:, :k] @ Xu[:k]`` of the shared factors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from supernet import GLoraLayer, glora_layers

from ..hooks import TrainingHooks
from .lorapro import DEFAULT_DAMPING, lora_pro_grads
from .scaling import loraplus_param_groups


def low_rank_down_factors(model: nn.Module) -> set[int]:
    """The ids of the parameters LoRA+ speeds up: every GLoRA down factor ``glora_{A,B,C}d`` that
    holds low-rank choices only. A down factor whose first column is also a vector or scalar choice
    (a supernet built without ``vector_params``) is refused: the vector would inherit the ratio."""
    fast, shared = set(), []
    for name, layer in glora_layers(model):
        for t in "ABC":
            down = layer._parameters.get(f"glora_{t}d")
            if down is None or layer._parameters.get(f"glora_{t}u") is None or not down.requires_grad:
                continue
            kinds = {c.kind for c in layer.choices[t]}
            if kinds & {"vector", "scalar"} and layer._parameters.get(f"glora_{t}v") is None:
                shared.append(f"{name}.glora_{t}d")
                continue
            fast.add(id(down))
    if shared:
        raise ValueError(f"LoRA+: {shared[0]} holds vector or scalar choices in its first column, which would learn at the "
                         f"ratio too; build the GLoRA layers with vector_params=True ({len(shared)} such factor(s))")
    return fast


class LoraPlus(TrainingHooks):
    """LoRA+ (Hayou et al. 2024): the zero-initialised down factors learn ``ratio`` times faster
    than everything else (the up factors, vectors, scalars, D, E, DoRA's magnitudes, the head)."""

    name = "loraplus"

    def __init__(self, model: nn.Module, ratio: float):
        if not ratio > 0:
            raise ValueError(f"loraplus_lr_ratio: must be > 0, got {ratio!r}")
        self.ratio = float(ratio)
        self.fast = low_rank_down_factors(model)

    def param_groups(self, named_params, lr, weight_decay):
        return loraplus_param_groups(named_params, lambda n, p: id(p) in self.fast, lr=lr, ratio=self.ratio,
                                     weight_decay=weight_decay)


def active_paths(model: nn.Module, tensors: str = "ABC") -> list[tuple[GLoraLayer, str, int]]:
    """``(layer, tensor, rank)`` of every active low-rank choice of ``tensors`` of the model's GLoRA layers."""
    return [(layer, t, c.rank) for _, layer in glora_layers(model) for t in tensors
            if (c := layer.active[t]).kind == "lora"]


class LoraPro(TrainingHooks):
    """LoRA-Pro (Wang et al. 2024), efficient mode: after backward, each active low-rank path's
    factor gradients become those whose equivalent full-weight gradient ``s (B g̃_A + g̃_B A)`` is the
    projection of the full gradient onto what the path can express (:func:`lora_pro_grads`).

    For GLoRA's A the full gradient is ``W0 ⊙ G``; the factors' gradients are already those of
    ``s · Xd Xu`` against it, so one formula serves A and B. C is left alone: it is a vector
    ``(in, 1)``, so its up factor ``Cu: (r, 1)`` has rank 1 and every factor gradient is an outer
    product with it; ``Cd`` then stays nearly rank 1, and the ``(CdᵀCd)⁻¹`` of the projection
    amplifies rounding (measured: two processes against one differ by 1e-2 after six steps, where
    A and B agree to 1e-6). Only the active slice's columns and rows change; the rest of a shared
    factor has no gradient this step.
    """

    name = "lora_pro"

    def __init__(self, model: nn.Module, damping: float = DEFAULT_DAMPING):
        self.model = model
        self.damping = damping

    def after_backward(self, model: nn.Module, step: int) -> None:
        with torch.no_grad():
            for layer, t, k in active_paths(model, "AB"):
                down, up = getattr(layer, f"glora_{t}d"), getattr(layer, f"glora_{t}u")
                if down.grad is None or up.grad is None:
                    continue
                gd, gu = down.grad[:, :k], up.grad[:k]
                s = layer.lora_factor(layer.active[t]) or 1.0
                # B = 0 (the start, or a slice no step has reached yet) is found by the function
                new = lora_pro_grads(up[:k], down[:, :k], gu, gd, s, self.damping)
                gu.copy_(new.gA)
                gd.copy_(new.gB)


def lora_training_hooks(model: nn.Module, loraplus_lr_ratio: float | None, lora_pro: bool) -> list[TrainingHooks]:
    """The hooks of the ``lora:`` block's training options for ``model`` (its GLoRA layers applied)."""
    hooks: list[TrainingHooks] = []
    if loraplus_lr_ratio is not None:
        hooks.append(LoraPlus(model, loraplus_lr_ratio))
    if lora_pro:
        hooks.append(LoraPro(model))
    return hooks


__all__: Sequence[str] = ("LoraPlus", "LoraPro", "lora_training_hooks", "low_rank_down_factors", "active_paths")
