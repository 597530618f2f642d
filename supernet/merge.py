"""Structural re-parameterisation: fold every GLoRA layer into a plain ``nn.Linear`` or ``nn.Conv2d`` (docs/method.md §1)."""

from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.nn as nn

from .layer import GLoraLayer
from .model import glora_layers, set_submodule, set_subnet


class MergeError(RuntimeError):
    """Merging produced non-finite weights; the model was left as it was."""


@torch.no_grad()
def merged_linear(layer: GLoraLayer, name: str = "layer") -> nn.Module:
    """A new plain layer (``nn.Linear``, or the convolution's own kind) equal to ``layer`` under its active configuration."""
    W, b = layer.merged_weight_bias()
    if not torch.isfinite(W).all() or (b is not None and not torch.isfinite(b).all()):
        raise MergeError(f"{name}: merged weights are not finite (active choice {layer.active}); nothing was merged")
    dtype = layer.weight.dtype
    plain = layer.plain(bias=b is not None)
    plain.weight.copy_(W.to(dtype))
    if b is not None:
        plain.bias.copy_(b.to(dtype))
    plain.requires_grad_(False)
    return plain


merged_module = merged_linear


@torch.no_grad()
def merge_glora(model: nn.Module) -> nn.Module:
    """Replace every GLoRA layer by the plain ``nn.Linear`` (``nn.Conv2d``) holding ``W`` and ``b`` of its active choice.

    All layers are computed (in float32 or higher) and checked before any is swapped in, so a
    non-finite result raises :class:`MergeError` and leaves the model untouched.
    """
    merged = [(name, merged_linear(layer, name)) for name, layer in glora_layers(model)]
    for name, linear in merged:
        set_submodule(model, name, linear)
    for attr in ("glora_space",):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def added_biases(model: nn.Module) -> list[str]:
    """The GLoRA layers whose merged form gains a bias the base layer lacks (C or E active on a
    layer built without one): their ``<name>.bias`` is a key an untouched model does not have."""
    return [name for name, layer in glora_layers(model)
            if layer.bias is None and not (layer.active.C.is_none and layer.active.E.is_none)]


def merged_bias_slots(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """The bias-free ``nn.Linear``/``nn.Conv2d`` layers of ``model`` for which ``state`` holds a ``<name>.bias`` of
    their output size: the biases a merge created (see :func:`added_biases`)."""
    own = model.state_dict()
    names = []
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        if leaf != "bias" or key in own or not name:
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is None and tuple(value.shape) == (module.weight.shape[0],):
            names.append(name)
    return names


@torch.no_grad()
def add_zero_biases(model: nn.Module, names: list[str]) -> None:
    """Give each bias-free ``nn.Linear``/``nn.Conv2d`` named (:func:`merged_bias_slots`) a zero bias, so a merged
    state dict loads into a freshly built base model with ``strict=True``."""
    for name in names:
        module = model.get_submodule(name)
        module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype, device=module.weight.device),
                                   requires_grad=module.weight.requires_grad)


class MergedCopy:
    """One plain copy of a GLoRA ``model`` (each GLoRA layer a plain ``nn.Linear`` or convolution of its
    shape, with a bias), into whose tensors :meth:`load` merges a sub-network in place: no model is
    built per sub-network, and a compiled :attr:`plain` keeps reading the same tensors."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = dict(glora_layers(model))
        plain = copy.deepcopy(model)
        for name, layer in self.layers.items():
            parent, _, attr = name.rpartition(".")  # a plain nn.Linear or convolution of the layer's shape
            setattr(plain.get_submodule(parent) if parent else plain, attr, layer.plain(bias=True))
        self.plain = plain.eval().requires_grad_(False)
        self.targets = {n: self.plain.get_submodule(n) for n in self.layers}

    @torch.no_grad()
    def load(self, config) -> nn.Module:
        """Activate ``config`` on the GLoRA model and copy its merged weights into :attr:`plain` (returned)."""
        set_subnet(self.model, config)
        for name, layer in self.layers.items():
            target = self.targets[name]
            layer.merged_weight_bias(out=(target.weight, target.bias))
        return self.plain
