"""``adapted.safetensors``: the export of a method that cannot merge into the plain model (VPT's
prompts, an adapter's non-linear bottleneck). It holds the adapted model's full state dict and
what rebuilds it: the timm name and kwargs, the method and its settings, the run's space, the
input size and normalisation. :func:`write_adapted` writes it, :func:`create_adapted_model` and
:func:`load_adapted` read it back (evaluate.py does)."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors.torch import save_file

from supernet import AdapterError, SpaceError, atomic_write, read_metadata, read_safetensors, state_dict_mismatch
from supernet.export import model_from_metadata

from . import get
from .base import Method, MethodError
from .supernets import parse_space

ADAPTED_FILE = "adapted.safetensors"


def write_adapted(model: nn.Module, path: str | os.PathLike, method: Method, settings: Any, space: Any, model_name: str,
                  kwargs: Mapping[str, Any], spec: tuple[int, tuple[float, ...], tuple[float, ...]]) -> None:
    """Write ``model`` (adapted by ``method`` with ``settings``, over ``space``) with what rebuilds it."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"model": model_name, "kwargs": json.dumps(dict(kwargs)), "method": method.name,
            "settings": json.dumps(dataclasses.asdict(settings)), "space": json.dumps(parse_space(space).to_dict()),
            "input": json.dumps(dict(zip(("size", "mean", "std"), spec)))}
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


def is_adapted(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an adapted export (a safetensors file whose metadata names a method)."""
    try:
        return Path(path).suffix == ".safetensors" and bool(read_metadata(path).get("method"))
    except AdapterError:
        return False


def _method_of(path: str, meta: Mapping[str, str]) -> tuple[Method, Any, Any]:
    try:
        method = get(meta["method"])
        settings = method.config(**json.loads(meta.get("settings") or "{}"))
        space = parse_space(json.loads(meta["space"]))
    except (MethodError, SpaceError, TypeError, ValueError, KeyError) as err:
        raise AdapterError(f"{path}: its method metadata cannot be used ({str(err)[:200]})") from None
    return method, settings, space


def load_adapted(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Adapt a freshly built base ``model`` as the file says and load its weights strictly.
    Raises :class:`AdapterError` naming the file and the keys that do not fit."""
    tensors, meta = read_safetensors(path)
    method, settings, space = _method_of(str(path), meta)
    method.apply(model, settings, space)
    problems = state_dict_mismatch(model.state_dict(), tensors)
    if problems:
        raise AdapterError(f"{path}: does not fit {type(model).__name__} with {method.name}: {problems}")
    model.load_state_dict(tensors, strict=True)
    return model


def create_adapted_model(path: str | os.PathLike) -> nn.Module:
    """The adapted model of an ``adapted.safetensors``, from the file alone, in eval mode."""
    tensors, meta = read_safetensors(path)
    return load_adapted(model_from_metadata(path, tensors, meta), path).eval()


@torch.no_grad()
def forward_time_ratio(model: nn.Module, base: nn.Module, x: torch.Tensor, repeats: int = 7) -> float:
    """The adapted model's forward time over the base model's on the batch ``x``: the median of
    ``repeats`` interleaved pairs (after one warm-up each), so that both see the same machine load."""
    model.eval(), base.eval()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def timed(m: nn.Module) -> float:
        sync()
        t0 = time.perf_counter()
        m(x)
        sync()
        return time.perf_counter() - t0

    timed(model), timed(base)
    ratios = [timed(model) / max(timed(base), 1e-9) for _ in range(repeats)]
    return round(statistics.median(ratios), 3)
