"""Sub-network configurations: one :class:`LayerChoice` per adapted layer, kept in YAML.

A configuration file is a mapping from layer name to its five choices::

    blocks.0.attn.qkv: {A: lora8, B: lora4, C: vector, D: scalar, E: none}
    blocks.0.attn.proj: {A: none, B: lora8, C: none, D: vector, E: vector}

Files that wrap it under a ``subnet:`` key (the search result, an adapter's YAML) load too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

from .atomic import atomic_write_text
from .space import TENSORS, LayerChoice, SpaceError

Subnet = dict[str, LayerChoice]


def parse_subnet(data: Mapping[str, Any], source: str = "subnet") -> Subnet:
    if isinstance(data, Mapping) and "subnet" in data and isinstance(data["subnet"], Mapping):
        data = data["subnet"]
    if not isinstance(data, Mapping) or not data:
        raise SpaceError(f"{source}: expected a non-empty mapping from layer name to its choices {{A, B, C, D, E}}")
    problems, out = [], {}
    for name, value in data.items():
        try:
            out[str(name)] = LayerChoice.parse(value, str(name))
        except SpaceError as err:
            problems.append(str(err))
    if problems:
        raise SpaceError(f"{source}: " + "; ".join(problems))
    return out


def load_subnet(config: "Subnet | Mapping[str, Any] | str | os.PathLike") -> Subnet:
    """A configuration from a dict, a parsed :data:`Subnet`, or a YAML file."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise SpaceError(f"{path}: sub-network file not found (expected a YAML file)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            raise SpaceError(f"{path}: not valid YAML") from None
        return parse_subnet(data, str(path))
    return parse_subnet(config)


def subnet_to_dict(config: Subnet) -> dict[str, dict[str, str]]:
    return {name: choice.to_dict() for name, choice in config.items()}


def dump_subnet_yaml(config: Subnet) -> str:
    # One flow-style line per layer keeps a 50-layer file readable.
    lines = []
    for name, choice in config.items():
        inner = ", ".join(f"{t}: {choice[t]}" for t in TENSORS)
        lines.append(f"{yaml.safe_dump(name, default_style=None).strip().removesuffix('...').strip()}: {{{inner}}}")
    return "\n".join(lines) + "\n"


def save_subnet(config: Subnet, path: str | os.PathLike) -> None:
    atomic_write_text(path, dump_subnet_yaml(config))


def draw_choices(choices: Mapping[str, Mapping[str, Sequence]], generator: torch.Generator,
                 tensors: Sequence[str]) -> dict[str, list]:
    """Draw each tensor's option of each layer uniformly (docs/method.md §3): layers in the order
    given, tensors in ``tensors``' order, one uniform per tensor with more than one option, all from
    one generator call, so a seeded generator gives the same draws in every process. Any supernet
    whose layers hold named tensors with option lists samples with it (GLoRA's A..E, NOAH's modules)."""
    n_draws = sum(len(per_tensor[t]) > 1 for per_tensor in choices.values() for t in tensors)
    # One call for every draw: a generator call per tensor costs more than the rest of sampling.
    u = iter(torch.rand(n_draws, generator=generator, dtype=torch.float64).tolist())
    out = {}
    for name, per_tensor in choices.items():
        picked = []
        for t in tensors:
            options = per_tensor[t]
            n = len(options)
            picked.append(options[min(int(next(u) * n), n - 1)] if n > 1 else options[0])
        out[name] = picked
    return out


def sample_config(choices: Mapping[str, Mapping[str, tuple]], generator: torch.Generator) -> Subnet:
    """A GLoRA configuration drawn with :func:`draw_choices`, tensors A..E."""
    return {name: LayerChoice(*picked) for name, picked in draw_choices(choices, generator, TENSORS).items()}
