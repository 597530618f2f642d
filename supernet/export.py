"""``merged.safetensors``, the plain model retrain.py exports: written here once the merge is
verified, and read back here (into a freshly built model, or with its model created from the file).

The file holds the merged model's full state dict, plus metadata: ``model`` (the timm name),
``kwargs`` (JSON), ``input`` (JSON: size, mean, std), ``merge_max_abs_diff`` and ``added_biases``
(JSON: the bias-free layers the merge gave a bias, C or E chosen on them; see :func:`added_biases`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .io import AdapterError, atomic_write, read_metadata, read_safetensors, state_dict_mismatch, timm_classifier_outputs
from .fold import fold_biases_into_norms
from .layer import GLoraLayer
from .merge import MergeError, add_zero_biases, added_biases, merge_glora, merged_bias_slots


# Relative to the largest unmerged logit: fp32 round-off grows with the logits' scale (measured: a
# 4-block ViT with logits up to 12 differs from its own float64 evaluation by 2.6e-4), while a wrong
# merge is off by O(1) of that scale.
MERGE_TOLERANCE = 1e-4


def _within_roundoff(model: nn.Module, x: torch.Tensor, want: torch.Tensor, got: torch.Tensor, tol: float) -> bool:
    """Large adapters can make fp32 round-off itself exceed the tolerance; then ask the exact
    question: is the merged model as close to the float64 evaluation of the unmerged one as the fp32
    unmerged evaluation is (within 2x)? A wrong merge is off by far more than round-off."""
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
    err_unmerged = (want.double() - exact).abs().max().item()
    err_merged = (got.double() - exact).abs().max().item()
    return err_merged <= max(2 * err_unmerged, tol)


def write_merged(model: nn.Module, path: str | os.PathLike, x: torch.Tensor, model_name: str, kwargs: Mapping[str, Any],
                 spec: tuple[int, tuple[float, ...], tuple[float, ...]],
                 merge: Callable[[nn.Module], nn.Module] | None = None) -> list[str]:
    """Merge a copy of ``model`` (in eval mode) with ``merge`` (default: its GLoRA layers merged; a
    model without them as it is; another method's merge from ``methods``), check that it
    predicts the batch ``x`` as the unmerged model does, and only then write it to ``path`` with its
    metadata (``model_name``, ``kwargs``, the input ``spec``: size, mean, std). Returns the layers
    the merge gave a bias they lacked and that could not be folded into a following batch norm
    (:func:`supernet.fold.fold_biases_into_norms`). Raises :class:`MergeError`, writing nothing, on a mismatch."""
    path = Path(path)
    has_glora = any(isinstance(m, GLoraLayer) for m in model.modules())
    gained = added_biases(model) if has_glora else []
    with torch.no_grad():
        want = model(x).float()
        if merge is None:
            merge = merge_glora if has_glora else (lambda m: m)
        merged = merge(copy.deepcopy(model))
        # a bias a convolution gained moves into the batch norm reading it: the plain architecture again
        folded = fold_biases_into_norms(merged, gained, x)
        gained = [name for name in gained if name not in folded]
        got = merged(x).float()
    diff = (got - want).abs().max().item()
    tol = MERGE_TOLERANCE * max(1.0, want.abs().max().item())
    if not (diff <= tol or (math.isfinite(diff) and _within_roundoff(model, x, want, got, tol))):
        raise MergeError(f"merged and unmerged outputs differ by {diff:.3g} (> {tol:.3g} = {MERGE_TOLERANCE} x the largest "
                         f"logit, at least 1, and more than fp32 round-off) on a validation batch; "
                         f"{path} was not written")
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"model": model_name, "kwargs": json.dumps(kwargs),
                                                                   "input": json.dumps(dict(zip(("size", "mean", "std"), spec))),
                                                                   "merge_max_abs_diff": f"{diff:.3g}",
                                                                   "added_biases": json.dumps(gained),
                                                                   "folded_biases": json.dumps(folded)}))
    return gained


def merged_file_summary(path: str | os.PathLike) -> tuple[int, list[str]]:
    """The merged model's parameter count, and the layers the merge gave a bias they lacked (see
    :func:`write_merged`), from the file's header alone."""
    with safe_open(str(path), framework="pt") as fh:
        total = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
        return total, json.loads((fh.metadata() or {}).get("added_biases", "[]"))


def merged_input_spec(path: str | os.PathLike) -> dict:
    """The ``input`` metadata of a merged file (size, mean, std; ``{}`` for a file written before
    it was recorded). Raises :class:`AdapterError` when it is not a JSON object."""
    try:
        spec = json.loads(read_metadata(path).get("input") or "{}")
    except ValueError:
        spec = None
    if not isinstance(spec, dict):
        raise AdapterError(f"{path}: metadata 'input' is not a JSON object with size, mean and std")
    return spec


def load_merged(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], name: str | None = None) -> nn.Module:
    """Load a merged checkpoint (``retrain/merged.safetensors``, or its state dict) into a freshly
    built base ``model`` with ``strict=True``, first giving a bias to the bias-free layers the merge
    gave one (C or E chosen on them, see :func:`added_biases`). Raises :class:`AdapterError` naming
    ``name`` (default: the path) and the keys that do not fit, with the model unchanged."""
    if isinstance(source, Mapping):
        tensors, label = source, name or "state dict"
    else:
        tensors, _ = read_safetensors(source)
        label = name or str(source)
    layers = merged_bias_slots(model, tensors)
    slots = {layer + ".bias" for layer in layers}
    problems = state_dict_mismatch(model.state_dict(), {k: v for k, v in tensors.items() if k not in slots})
    if problems:
        raise AdapterError(f"{label}: does not fit {type(model).__name__}: {problems}")
    add_zero_biases(model, layers)
    model.load_state_dict(tensors, strict=True)
    return model


def model_from_metadata(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> nn.Module:
    """A fresh timm model as an exported file's metadata describes it (``model``, ``kwargs``), with
    the classifier sized from its weights; weights not loaded."""
    import timm

    name = meta.get("model")
    if not name:
        raise AdapterError(f"{path}: its metadata names no model (retrain.py's exports do); "
                           "build the model yourself and load the weights into it")
    try:
        kwargs = json.loads(meta.get("kwargs") or "{}")
    except ValueError:
        raise AdapterError(f"{path}: metadata 'kwargs' is not JSON: {meta['kwargs'][:100]!r}") from None
    num_classes = timm_classifier_outputs(name, kwargs, tensors)
    try:
        return timm.create_model(name, pretrained=False, **({"num_classes": num_classes} if num_classes else {}), **kwargs)
    except (TypeError, RuntimeError) as err:
        raise AdapterError(f"{path}: cannot create its model {name!r} with {kwargs} ({str(err)[:200]})") from None


def create_merged_model(path: str | os.PathLike) -> nn.Module:
    """The ordinary timm model in ``retrain.py``'s ``merged.safetensors``, from the file alone: the
    architecture from its metadata (``model``, ``kwargs``), the classifier's size from its weights,
    loaded strictly (with any biases the merge added, see :func:`load_merged`), in eval mode."""
    tensors, meta = read_safetensors(path)
    return load_merged(model_from_metadata(path, tensors, meta), tensors, str(path)).eval()
