"""Backbones: timm models built by name, with weights from timm's hub or from a local file."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn

from supernet import AdapterError, classifier_names, read_safetensors, state_dict_mismatch

from .checkpoint import safe_torch_load
from .config import ModelConfig
from .pretrained import PretrainedError, resolve_checkpoint, to_timm_layout


class ModelError(ValueError):
    """A model cannot be built or its weights do not fit."""


def _head_prefixes(model: nn.Module) -> list[str]:
    return [n + "." for n in classifier_names(model)]


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` loaded with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return read_safetensors(path)[0]
        except AdapterError as err:
            raise ModelError(str(err)) from None
    state = safe_torch_load(path, ModelError)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``model``, skipping its classifier (reset for the task).

    ``path`` may be ``package:NAME`` (the weights file an installed package ships). ``.npz`` files
    in the original ViT format go through timm's own reader; state dicts of other EfficientNet code
    are renamed onto timm's keys (:mod:`engine.pretrained`).
    """
    try:
        path = resolve_checkpoint(str(path))
    except PretrainedError as err:
        raise ModelError(f"model.checkpoint: {err}") from None
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise ModelError(f"{path}: .npz checkpoints are only readable for timm ViT models")
        head = {k: v.clone() for k, v in model.state_dict().items() if any(k.startswith(p) for p in _head_prefixes(model))}
        try:
            model.load_pretrained(str(path))
        except Exception as err:
            raise ModelError(f"{path}: cannot load as a ViT .npz checkpoint ({type(err).__name__}: {str(err)[:200]})") from None
        model.load_state_dict(head, strict=False)
        return
    state = load_state_file(path)
    heads = _head_prefixes(model)
    full = model.state_dict()
    try:
        state = to_timm_layout(state, full, str(path), frozenset(k for k in full if any(k.startswith(p) for p in heads)))
    except PretrainedError as err:
        raise ModelError(str(err)) from None
    own = {k: v for k, v in full.items() if not any(k.startswith(p) for p in heads)}
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in heads)}
    problems = state_dict_mismatch(own, state)
    if problems:
        raise ModelError(f"{path}: does not fit {type(model).__name__}: {problems}")
    model.load_state_dict(state, strict=False)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """``timm.create_model`` with the task's classifier; weights from timm or ``cfg.checkpoint``."""
    from .preflight import model_kwargs

    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=num_classes, **model_kwargs(cfg))
    except OSError as err:  # the hub's download errors (no network, no such file in the cache, HTTP) are OSErrors
        if not cfg.pretrained:
            raise
        first = (str(err).splitlines() or [""])[0][:200]
        raise ModelError(f"model.pretrained: cannot fetch the weights of {cfg.name!r} from timm's hub ({type(err).__name__}: {first}); "
                         "without a network, set model.checkpoint to a local .npz/.safetensors/.pth file "
                         "(HF_HUB_OFFLINE=1 makes this fail at once instead of after retries)") from None
    except TypeError as err:
        raise ModelError(f"model.kwargs: {cfg.name} does not accept these arguments ({err})") from None
    except RuntimeError as err:
        raise ModelError(f"model.name: cannot create {cfg.name!r} ({str(err)[:200]})") from None
    except Exception as err:  # validation built this model on the meta device already; still never a traceback
        raise ModelError(f"model.kwargs: {cfg.name} cannot be built with {cfg.kwargs!r} ({type(err).__name__}: {str(err)[:200]})") from None
    if cfg.checkpoint:
        load_backbone_weights(model, cfg.checkpoint)
    if cfg.head_init == "zero":
        for name in _head_prefixes(model):
            for p in model.get_submodule(name.rstrip(".")).parameters():
                nn.init.zeros_(p)
    return model


def set_grad_checkpointing(model: nn.Module, key: str) -> None:
    """timm's activation checkpointing: blocks recompute their activations in the backward pass
    instead of keeping them (less memory, about one more forward of time)."""
    setter = getattr(model, "set_grad_checkpointing", None)
    if setter is None:
        raise ModelError(f"{key}: {type(model).__name__} has no set_grad_checkpointing; set it to false")
    try:
        setter(True)
    except (AssertionError, NotImplementedError) as err:  # timm's way of saying a model cannot
        raise ModelError(f"{key}: {type(model).__name__} does not support it ({err or type(err).__name__}); set it to false") from None


def input_size(model: nn.Module) -> int:
    """The square image size the model expects."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None):
        return int(patch.img_size[0])
    return int(cfg.get("input_size", (3, 224, 224))[-1])
