"""Adapter files: the trainable GLoRA tensors and the head as safetensors, the configuration as YAML.

Every write goes to a temporary file in the target folder, is flushed to disk, then renamed
over the target, so a crash mid-write never leaves a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write, atomic_write_text
from .conv import GLoraConv2d, conv_problem
from .layer import GLoraLayer, GLoraLinear, check_lora_scaling
from .layer_options import LORA_INITS
from .plans import OFFSETS, LoraScaling
from .model import classifier_names, get_subnet, glora_layer, glora_layers, mark_trainable, set_submodule, set_subnet
from .space import TENSORS, SpaceError, parse_choice
from .subnet import subnet_to_dict

FORMAT = "glora-adapter/1"


class AdapterError(ValueError):
    """An adapter or weights file is missing, unreadable, or does not fit the model."""


def _running_stat_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of batch-norm running statistics: buffers, not parameters, so training
    in train mode updates them although the backbone is frozen (a CNN's, not a ViT's: it has none)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            keys.update(f"{name}.{b}" if name else b for b, v in module.named_buffers(recurse=False) if v is not None)
    return keys


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """GLoRA tensors, the modules to save (the head) and batch-norm running statistics (which
    training updates: without them a CNN's adapters would be loaded onto statistics they were not
    trained with); never the frozen backbone's weights."""
    keep = list(getattr(model, "glora_modules_to_save", []))
    stats = _running_stat_keys(model)
    out = {}
    for key, value in model.state_dict().items():
        last = key.rsplit(".", 1)[-1]
        if last.startswith("glora_") or key in stats or any(key.startswith(m + ".") for m in keep):
            out[key] = value.detach().contiguous()
    return out


def _geometry(module: nn.Module) -> dict[str, Any]:
    """What a saved layer records of its base layer's shape: in/out features of a linear layer
    (the keys files have always had); of a convolution also its kind, kernel, stride, padding,
    dilation and groups."""
    if isinstance(module, (nn.Conv2d, GLoraConv2d)):
        padding = module.padding if isinstance(module.padding, str) else list(module.padding)
        return {"kind": "conv2d", "in_features": module.in_channels, "out_features": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride), "padding": padding,
                "dilation": list(module.dilation), "groups": module.groups}
    return {"in_features": module.in_features, "out_features": module.out_features}


# What a layer record holds besides its base layer's geometry.
_NOT_GEOMETRY = ("bias", "choices", "lora_alpha", "use_rslora", "vector_params", "use_dora", "lora_init")


def _layer_record(layer: GLoraLayer) -> dict[str, Any]:
    rec = {
        **_geometry(layer),
        "bias": layer.bias is not None,
        "choices": {t: [str(c) for c in layer.choices[t]] for t in TENSORS},
    }
    if layer.lora_scaling is not None:  # LoRA's scale; a layer without these keys scales by 1 (files written before)
        rec.update(layer.lora_scaling.to_dict())
    if layer.vector_params:  # absent: vector choices in the down factor (files written before)
        rec["vector_params"] = True
    if layer.use_dora:  # DoRA (its magnitude glora_m is among the tensors); absent: false (files written before)
        rec["use_dora"] = True
    if layer.lora_init:  # PiSSA, LoRA-GA (offset form: the frozen glora_<t>d0/u0 are in the tensors); absent: LoRA's init
        rec["lora_init"] = dict(layer.lora_init)
    return rec


def _record_dora(rec: Mapping[str, Any]) -> bool:
    """Whether a layer record uses DoRA (absent: no); raises SpaceError for a value that is not a bool."""
    value = rec.get("use_dora", False)
    if not isinstance(value, bool):
        raise SpaceError(f"use_dora: must be true or false, got {value!r}")
    return value


def _record_init(rec: Mapping[str, Any]) -> dict[str, str]:
    """The data-aware inits a layer record holds, ``{tensor: kind}`` ({} without the key: files
    written before it); raises SpaceError for a bad one."""
    init = rec.get("lora_init") or {}
    if not isinstance(init, Mapping):
        raise SpaceError(f"lora_init: expected a mapping of A, B, C to {' or '.join(LORA_INITS)}, got {init!r}")
    for t, kind in init.items():
        if t not in ("A", "B", "C") or kind not in LORA_INITS:
            raise SpaceError(f"lora_init: expected A, B or C mapped to {' or '.join(LORA_INITS)}, got {t!r}: {kind!r}")
    return dict(init)


def _set_record_init(layer: GLoraLayer, init: Mapping[str, str]) -> None:
    """Give ``layer`` exactly the offsets ``init`` names, holding its current factors until the file's
    tensors are loaded over them (SpaceError where a tensor has no low-rank choice)."""
    layer.clear_lora_init()
    for t, kind in init.items():
        down, up = layer._lowrank_factors(t, kind)
        layer.set_lora_offsets(t, kind, down, up)


def _record_scaling(rec: Mapping[str, Any]) -> LoraScaling | None:
    """The LoRA scaling a layer record holds (None: scaled by 1); raises SpaceError for a bad one."""
    if rec.get("lora_alpha") is None:
        if rec.get("use_rslora"):
            raise SpaceError("use_rslora without lora_alpha")
        return None
    return check_lora_scaling(LoraScaling(rec["lora_alpha"], rec.get("use_rslora", False)))


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    yaml_path: str | os.PathLike | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``path`` (safetensors: GLoRA tensors + head) and its YAML (default: same name, ``.yaml``).

    The YAML holds each layer's allowed choices and the active sub-network, plus ``metadata``.
    """
    path = Path(path)
    yaml_path = Path(yaml_path) if yaml_path is not None else path.with_suffix(".yaml")
    layers = {name: _layer_record(layer) for name, layer in glora_layers(model)}
    if not layers:
        raise AdapterError(f"{path}: the model has no GLoRA layers to save")
    doc = {
        "format": FORMAT,
        "metadata": dict(metadata or {}),
        "modules_to_save": list(getattr(model, "glora_modules_to_save", [])),
        "layers": layers,
        "subnet": subnet_to_dict(get_subnet(model)),
    }
    tensors = adapter_state_dict(model)
    header = {"format": FORMAT, "glora": json.dumps(doc)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    atomic_write_text(yaml_path, yaml.safe_dump(doc, sort_keys=False, width=200, default_flow_style=None))


@contextlib.contextmanager
def _open_safetensors(path: Path):
    """``safe_open(path)``, with a clear :class:`AdapterError` for a missing, empty or unreadable file
    (also when reading from it fails)."""
    if not path.is_file():
        raise AdapterError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise AdapterError(f"{path}: empty file, expected safetensors")
    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    with _open_safetensors(Path(path)) as fh:
        return fh.metadata() or {}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, with a clear error for a bad file."""
    with _open_safetensors(Path(path)) as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}


def _read_doc(path: Path, yaml_path: Path | None, meta: Mapping[str, str]) -> dict[str, Any]:
    if yaml_path is None and path.with_suffix(".yaml").is_file():
        yaml_path = path.with_suffix(".yaml")
    if yaml_path is not None:
        try:
            doc = yaml.safe_load(Path(yaml_path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise AdapterError(f"{yaml_path}: cannot read adapter YAML ({type(err).__name__})") from None
        source = str(yaml_path)
    elif "glora" in meta:
        doc, source = json.loads(meta["glora"]), str(path)
    else:
        raise AdapterError(f"{path}: no adapter description (no YAML beside it and no GLoRA metadata inside)")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("layers"), dict):
        raise AdapterError(f"{source}: not a GLoRA adapter description (expected format: {FORMAT} and a 'layers' mapping)")
    return doc


def state_dict_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """How ``state`` fails to fit a model whose state dict is ``own`` (the first few missing,
    unexpected and wrongly shaped keys of each kind), or "" when it fits."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if keys:
            parts.append(f"{label} {', '.join(keys[:3])}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""))
    return "; ".join(parts)


def timm_classifier_outputs(name: str, kwargs: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> int | None:
    """How many classes a full state dict of the timm model ``name`` (built with ``kwargs``) was
    saved with, read from its classifier's weight; None where there is none to read."""
    import timm

    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, num_classes=2, **kwargs)
    except (TypeError, RuntimeError):
        return None  # a bad name or kwargs: the caller's own build reports it
    for head in classifier_names(probe):
        weight = tensors.get(head + ".weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def adapter_metadata(path: str | os.PathLike, yaml_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``metadata`` :func:`save_adapter` stored with an adapter file (from its YAML, or from the
    safetensors header when there is no YAML), without reading the tensors."""
    path = Path(path)
    meta: dict[str, str] = {}
    if yaml_path is None and not path.with_suffix(".yaml").is_file():
        meta = read_metadata(path)
    doc = _read_doc(path, Path(yaml_path) if yaml_path is not None else None, meta)
    return dict(doc.get("metadata") or {})


def load_adapter(
    model: nn.Module, path: str | os.PathLike, yaml_path: str | os.PathLike | None = None, strict: bool = True
) -> nn.Module:
    """Rebuild the saved GLoRA layers on a freshly built base ``model`` and load their tensors.

    Refuses, naming the layer or key, when a saved layer is missing from the model, is not an
    ``nn.Linear`` (an ``nn.Conv2d`` for a saved convolution), or has other shapes. The model is only changed once every check passed.
    """
    path = Path(path)
    tensors, meta = read_safetensors(path)
    doc = _read_doc(path, Path(yaml_path) if yaml_path else None, meta)
    modules = dict(model.named_modules())
    problems, new_layers, scalings, doras, inits = [], {}, {}, {}, {}
    for name, rec in doc["layers"].items():
        module = modules.get(name)
        if module is None:
            problems.append(f"layer {name} is not in the model")
            continue
        conv = rec.get("kind") == "conv2d"
        if conv and not (isinstance(module, (nn.Conv2d, GLoraConv2d)) and conv_problem(module) is None):
            problems.append(f"layer {name} is a {type(module).__name__}, not an nn.Conv2d GLoRA can adapt (the file holds a convolution)")
            continue
        if not conv and not isinstance(module, (nn.Linear, GLoraLinear)):
            problems.append(f"layer {name} is a {type(module).__name__}, not an nn.Linear")
            continue
        want = {k: v for k, v in rec.items() if k not in _NOT_GEOMETRY}
        have = _geometry(module)
        if have != want:
            diff = ", ".join(f"{k} {have.get(k)} vs file {want.get(k)}" for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
            problems.append(f"layer {name}: model and file differ: {diff}")
            continue
        try:
            choices = {t: [parse_choice(c, t, f"{name}.{t}") for c in rec["choices"][t]] for t in TENSORS}
        except (SpaceError, KeyError, TypeError) as err:
            problems.append(f"layer {name}: bad choices ({err})")
            continue
        try:
            scalings[name] = _record_scaling(rec)
        except (SpaceError, TypeError) as err:
            problems.append(f"layer {name}: bad LoRA scaling ({err})")
            continue
        if not isinstance(rec.get("vector_params", False), bool):
            problems.append(f"layer {name}: vector_params must be true or false, got {rec['vector_params']!r}")
            continue
        if isinstance(module, GLoraLayer) and module.vector_params != rec.get("vector_params", False):
            problems.append(f"layer {name}: vector_params {module.vector_params} in the model, {rec.get('vector_params', False)} in the file")
            continue
        try:
            doras[name] = _record_dora(rec)
        except SpaceError as err:
            problems.append(f"layer {name}: {err}")
            continue
        if isinstance(module, GLoraLayer) and module.use_dora and not doras[name]:
            problems.append(f"layer {name} uses DoRA and the file's does not (DoRA cannot be turned off)")
            continue
        new_layers[name] = (glora_layer(module, choices, scalings[name], rec.get("vector_params", False))
                            if not isinstance(module, GLoraLayer) else None)
        if new_layers[name] is not None and doras[name]:
            new_layers[name].set_dora(True)  # registers glora_m, which the file's tensor then fills
        try:
            inits[name] = _record_init(rec)
            # the frozen initial factors exist before the tensors are checked and loaded; a layer
            # already in the model gets them only once every check passed
            if new_layers[name] is not None:
                _set_record_init(new_layers[name], inits[name])
            else:
                for t, kind in inits[name].items():
                    module._lowrank_factors(t, kind)  # the checks alone
        except (SpaceError, TypeError, ValueError) as err:
            problems.append(f"layer {name}: bad lora_init ({err})")
            continue
    if problems:
        raise AdapterError(f"{path}: does not fit the model: " + "; ".join(problems[:5]))

    # Check every tensor against the model as it will be, before touching the real model.
    expected = {}
    for key, value in model.state_dict().items():
        expected[key] = tuple(value.shape)
    for name, layer in new_layers.items():
        if layer is None:  # a GLoRA layer already: the file's offsets replace its own
            for key in [f"{name}.{b}" for b in OFFSETS]:
                expected.pop(key, None)
            for t in inits[name]:
                for f in "du":
                    expected[f"{name}.glora_{t}{f}0"] = tuple(getattr(modules[name], f"glora_{t}{f}").shape)
            continue
        for key in [k for k in expected if k.startswith(name + ".")]:
            expected.pop(key)
        for pname, p in layer.state_dict().items():
            expected[f"{name}.{pname}"] = tuple(p.shape)
    for name, dora in doras.items():  # a GLoRA layer already, without DoRA yet: it gets the file's magnitude
        if dora and new_layers.get(name) is None:
            expected[f"{name}.glora_m"] = (modules[name].rows,)
    for key, value in tensors.items():
        if key not in expected:
            problems.append(f"{key} is not a tensor of the model")
        elif tuple(value.shape) != expected[key]:
            problems.append(f"{key}: file has shape {tuple(value.shape)}, model expects {expected[key]}")
    if strict:
        missing = [k for k in expected if k.rsplit(".", 1)[-1].startswith("glora_") and k not in tensors]
        if missing:
            problems.append(f"missing GLoRA tensors {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    if problems:
        raise AdapterError(f"{path}: does not fit the model: " + "; ".join(problems[:5]))

    for name, layer in new_layers.items():
        if layer is not None:
            set_submodule(model, name, layer)
        else:  # a GLoRA layer already: it takes the file's scale, DoRA if the file's has it, and its inits
            modules[name].set_lora_scaling(scalings[name])
            if doras[name]:
                modules[name].set_dora(True)
            _set_record_init(modules[name], inits[name])
    model.load_state_dict(tensors, strict=False)
    mark_trainable(model, [m for m in doc.get("modules_to_save", []) if m in modules])
    if doc.get("subnet"):
        set_subnet(model, doc["subnet"])
    return model
