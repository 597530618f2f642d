"""NOAH (Zhang, Zhou & Liu 2022, "Neural Prompt Search", arXiv 2206.04673; docs/methods/noah.md).

Every block of a timm ViT gets three prompt modules whose sizes are searched per block:

- ``prompt``: p VPT-Deep tokens inserted after the prefix tokens at the block's input, dropped at its output;
- ``lora``: a rank-r update of the attention's query and value projections, q += x Dqᵀ Uqᵀ, v += x Dvᵀ Uvᵀ;
- ``adapter``: a bottleneck of width a after the MLP, m <- m + up(gelu(down(m))).

A size of 0 leaves the module out of that block. As in GLoRA's supernet, every block holds each
module at the space's largest size and a sub-network uses the leading slices (weight
entanglement), so ``train.py`` trains all sub-networks at once, ``search.py`` evolves per-block
sizes under a parameter budget, and ``retrain.py`` retrains the chosen one, sliced out.

The space (``space:`` in the run config, e.g. ``configs/space/noah.yaml``)::

    method: noah
    choices: {prompt: [0, 5, 10], lora: [0, 4, 8], adapter: [0, 4, 8]}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import vit_blocks
from .base import Method, MethodError, freeze_all_but_head, trainable_outside_head
from .vpt import init_bound

MODULES = ("prompt", "lora", "adapter")


@dataclass(frozen=True)
class NoahSpace:
    """The sizes each block's modules may take (0: absent)."""

    choices: dict[str, tuple[int, ...]]
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        return {"method": "noah", "choices": {m: list(self.choices[m]) for m in MODULES}}

    def largest(self) -> dict[str, int]:
        return {m: max(self.choices[m]) for m in MODULES}


def is_noah_space(data: Any) -> bool:
    return isinstance(data, Mapping) and data.get("method") == "noah"


def load_noah_space(data: Mapping[str, Any], source: str = "<dict>") -> NoahSpace:
    """Validate a NOAH space; every problem in one :class:`MethodError`."""
    problems = []
    unknown = sorted(set(map(str, data)) - {"method", "choices"})
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)}; a NOAH space has method and choices")
    raw = data.get("choices")
    choices = {}
    if not isinstance(raw, Mapping):
        problems.append(f"choices: expected a mapping with keys {', '.join(MODULES)}")
        raw = {}
    extra = sorted(set(map(str, raw)) - set(MODULES))
    if extra:
        problems.append(f"choices: unknown key(s) {', '.join(extra)}; expected {', '.join(MODULES)}")
    for m in MODULES:
        sizes = raw.get(m)
        ok = isinstance(sizes, list) and sizes and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes)
        if not ok:
            problems.append(f"choices.{m}: expected a non-empty list of sizes >= 0 (0: no {m} in that block), got {sizes!r}")
        elif len(set(sizes)) != len(sizes):
            problems.append(f"choices.{m}: repeated sizes in {sizes}")
        else:
            choices[m] = tuple(sizes)
    if problems:
        raise MethodError(f"{source}: " + "; ".join(problems))
    return NoahSpace(choices=choices, source=source)


class LoraQV(nn.Module):
    """A fused qkv projection plus a rank-r update of its query and value thirds (the leading r of
    ``rank`` rows of the shared factors)."""

    def __init__(self, qkv: nn.Linear, rank: int, like: torch.Tensor):
        super().__init__()
        self.base = qkv
        d = qkv.in_features
        kw = dict(device=like.device, dtype=like.dtype)
        self.down = nn.Parameter(torch.empty(2, rank, d, **kw))
        self.up = nn.Parameter(torch.zeros(2, d, rank, **kw))
        with torch.no_grad():
            for i in range(2):
                nn.init.kaiming_uniform_(self.down[i], a=math.sqrt(5))
        self.active = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        r = self.active
        if r == 0:
            return y
        d = self.base.in_features
        dq = F.linear(F.linear(x, self.down[0, :r]), self.up[0, :, :r])
        dv = F.linear(F.linear(x, self.down[1, :r]), self.up[1, :, :r])
        return torch.cat((y[..., :d] + dq, y[..., d:2 * d], y[..., 2 * d:] + dv), dim=-1)


class AdapterMlp(nn.Module):
    """A block's MLP followed by a bottleneck of the active width (leading slices of the shared weights)."""

    def __init__(self, mlp: nn.Module, d: int, width: int, like: torch.Tensor):
        super().__init__()
        self.mlp = mlp
        kw = dict(device=like.device, dtype=like.dtype)
        self.down_weight = nn.Parameter(torch.empty(width, d, **kw))
        self.down_bias = nn.Parameter(torch.zeros(width, **kw))
        self.up_weight = nn.Parameter(torch.zeros(d, width, **kw))
        self.up_bias = nn.Parameter(torch.zeros(d if width else 0, **kw))  # no adapter, no bias
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        self.active = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp(x)
        a = self.active
        if a == 0:
            return m
        h = F.gelu(F.linear(m, self.down_weight[:a], self.down_bias[:a]))
        return m + F.linear(h, self.up_weight[:, :a], self.up_bias)


class NoahBlock(nn.Module):
    """A transformer block with its three NOAH modules (sizes: the shared maxima; ``active``: the sub-network's)."""

    def __init__(self, block: nn.Module, prefix: int, d: int, sizes: Mapping[str, int], bound: float, like: torch.Tensor):
        super().__init__()
        block.attn.qkv = LoraQV(block.attn.qkv, sizes["lora"], like)
        block.mlp = AdapterMlp(block.mlp, d, sizes["adapter"], like)
        self.block = block
        self.prefix = prefix
        self.prompt = nn.Parameter(torch.empty(sizes["prompt"], d, device=like.device, dtype=like.dtype))
        with torch.no_grad():
            nn.init.uniform_(self.prompt, -bound, bound)
        self.tokens = sizes["prompt"]

    @property
    def active(self) -> dict[str, int]:
        return {"prompt": self.tokens, "lora": self.block.attn.qkv.active, "adapter": self.block.mlp.active}

    def activate(self, sizes: Mapping[str, int]) -> None:
        self.tokens, self.block.attn.qkv.active, self.block.mlp.active = sizes["prompt"], sizes["lora"], sizes["adapter"]

    def sizes(self) -> dict[str, int]:
        return {"prompt": self.prompt.shape[0], "lora": self.block.attn.qkv.down.shape[1], "adapter": self.block.mlp.down_weight.shape[0]}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        n, p = self.prefix, self.tokens
        if p:
            tokens = self.prompt[:p].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat((x[:, :n], tokens, x[:, n:]), dim=1)
        x = self.block(x, *args, **kwargs)
        return torch.cat((x[:, :n], x[:, n + p:]), dim=1) if p else x


def module_cost(module: str, size: int, d: int) -> int:
    """Trainable parameters of one module at ``size`` in a block of width d (docs/methods/noah.md)."""
    if size == 0:
        return 0
    return {"prompt": size * d, "lora": 4 * d * size, "adapter": 2 * d * size + size + d}[module]


def noah_blocks(model: nn.Module) -> dict[str, NoahBlock]:
    blocks = {f"blocks.{i}": b for i, b in enumerate(getattr(model, "blocks", [])) if isinstance(b, NoahBlock)}
    if not blocks:
        raise MethodError("the model has no NOAH blocks; apply the NOAH supernet first")
    return blocks


def apply_noah(model: nn.Module, sizes: Mapping[str, int] | Mapping[str, Mapping[str, int]], space_source: str = "space") -> nn.Module:
    """Wrap every block of a timm ViT with NOAH modules of ``sizes`` (one mapping for all blocks, or
    one per block name), freeze the rest; the head stays trainable."""
    blocks = vit_blocks(model, "noah")
    freeze_all_but_head(model)
    d, bound = model.embed_dim, init_bound(model)
    for i, block in enumerate(blocks):
        per = sizes.get(f"blocks.{i}", sizes) if all(isinstance(v, Mapping) for v in sizes.values()) else sizes
        if not isinstance(per, Mapping) or set(per) != set(MODULES):
            raise MethodError(f"{space_source}: blocks.{i}: expected sizes for {', '.join(MODULES)}")
        like = next(p for p in block.parameters() if p.dtype.is_floating_point)
        model.blocks[i] = NoahBlock(block, model.num_prefix_tokens, d, per, bound, like)
    return model  # the new parameters train (created after the freeze), the block's own stay frozen


@dataclass(frozen=True)
class NoahSettings:
    """A NOAH sub-network: ``blocks`` maps each block to its modules' sizes (retrain.py fills it
    from the search's result); without it every block takes ``prompt``, ``lora`` and ``adapter``."""

    blocks: dict = field(default_factory=dict)
    prompt: int = 5
    lora: int = 4
    adapter: int = 4

    def __post_init__(self):
        for m in MODULES:
            v = getattr(self, m)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise MethodError(f"{m}: must be a size >= 0, got {v!r}")
        for name, per in self.blocks.items():
            if not isinstance(per, Mapping) or set(per) != set(MODULES) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in per.values()):
                raise MethodError(f"blocks: {name}: expected sizes >= 0 for {', '.join(MODULES)}, got {per!r}")


def _apply_settings(model: nn.Module, settings: NoahSettings, space) -> nn.Module:
    uniform = {m: getattr(settings, m) for m in MODULES}
    return apply_noah(model, settings.blocks or uniform)


METHOD = Method(
    name="noah",
    summary="NOAH's searched per-block VPT-Deep prompt length, LoRA rank (q, v) and adapter width",
    config=NoahSettings, apply=_apply_settings, count=trainable_outside_head, merge=None,
    inference="the chosen prompts, LoRA updates and adapters of each block (prompts: more tokens; adapters: two matmuls)",
    starts_at_base=False, searched=True,
)


# --- the supernet: what train.py, search.py and retrain.py ask of it (methods/supernets.py) ---

def parse_config(model: nn.Module, config: Mapping[str, Mapping[str, Any]], source: str = "subnet") -> dict[str, dict[str, int]]:
    """A sub-network for ``model``'s NOAH blocks, validated: every block, each module's size an
    integer within the block's shared size."""
    blocks = noah_blocks(model)
    if isinstance(config, Mapping) and isinstance(config.get("subnet"), Mapping):
        config = config["subnet"]
    problems = []
    missing = [n for n in blocks if n not in config]
    unknown = [str(n) for n in config if n not in blocks]
    if missing or unknown:
        problems.append(f"layers do not match the model's NOAH blocks (missing: {', '.join(missing[:3]) or 'none'}; "
                        f"unknown: {', '.join(unknown[:3]) or 'none'})")
    out = {}
    for name, block in blocks.items():
        per = config.get(name)
        if not isinstance(per, Mapping) or set(map(str, per)) != set(MODULES):
            if name in config:
                problems.append(f"{name}: expected sizes for {', '.join(MODULES)}, got {per!r}")
            continue
        sizes, limit = {}, block.sizes()
        for m in MODULES:
            v = per[m]
            v = int(v) if isinstance(v, str) and v.isdigit() else v
            if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= limit[m]):
                problems.append(f"{name}.{m}: expected a size in 0..{limit[m]}, got {per[m]!r}")
            sizes[m] = v
        out[name] = sizes
    if problems:
        raise MethodError(f"{source}: " + "; ".join(problems))
    return out


def activate(model: nn.Module, config: Mapping[str, Mapping[str, Any]], source: str = "subnet") -> dict[str, dict[str, int]]:
    config = parse_config(model, config, source)
    for name, block in noah_blocks(model).items():
        block.activate(config[name])
    return config


def block_choices(model: nn.Module, space: NoahSpace) -> dict[str, dict[str, list[str]]]:
    """Each block's options per module, as strings (the search's alphabet)."""
    return {name: {m: [str(s) for s in space.choices[m]] for m in MODULES} for name in noah_blocks(model)}


def block_costs(model: nn.Module, space: NoahSpace) -> dict[str, dict[str, dict[str, int]]]:
    d = model.embed_dim
    return {name: {m: {str(s): module_cost(m, s, d) for s in space.choices[m]} for m in MODULES} for name in noah_blocks(model)}


def config_cost(model: nn.Module, config: Mapping[str, Mapping[str, Any]]) -> int:
    d = model.embed_dim
    return sum(module_cost(m, s, d) for per in parse_config(model, config).values() for m, s in per.items())


@torch.no_grad()
def extract(model: nn.Module, config: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Keep only ``config``'s slices (the leading ones of each shared tensor), as trainable
    parameters of exactly the chosen sizes; the output is unchanged."""
    config = activate(model, config)
    for name, block in noah_blocks(model).items():
        p, r, a = (config[name][m] for m in MODULES)
        qkv, mlp = block.block.attn.qkv, block.block.mlp
        block.prompt = nn.Parameter(block.prompt[:p].clone())
        qkv.down, qkv.up = nn.Parameter(qkv.down[:, :r].clone()), nn.Parameter(qkv.up[:, :, :r].clone())
        mlp.down_weight, mlp.down_bias = nn.Parameter(mlp.down_weight[:a].clone()), nn.Parameter(mlp.down_bias[:a].clone())
        mlp.up_weight = nn.Parameter(mlp.up_weight[:, :a].clone())
        mlp.up_bias = nn.Parameter(mlp.up_bias[: (mlp.up_bias.shape[0] if a else 0)].clone())
    return model


NOAH_FORMAT = "noah-supernet/1"


def save_supernet(model: nn.Module, path, yaml_path, metadata: Mapping[str, Any]) -> None:
    """The NOAH modules' tensors and the head (safetensors), with a YAML beside it: the format, the
    blocks' shared sizes, the active sub-network and ``metadata``."""
    import json

    import yaml
    from safetensors.torch import save_file

    from supernet import atomic_write, atomic_write_text

    blocks = noah_blocks(model)
    doc = {"format": NOAH_FORMAT, "metadata": dict(metadata), "modules_to_save": list(getattr(model, "glora_modules_to_save", [])),
           "sizes": {n: b.sizes() for n, b in blocks.items()}, "subnet": {n: b.active for n, b in blocks.items()}}
    tensors = {k: p.detach().cpu().contiguous() for k, p in model.named_parameters() if p.requires_grad}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": NOAH_FORMAT, "noah": json.dumps(doc)}))
    atomic_write_text(yaml_path, yaml.safe_dump(doc, sort_keys=False, width=200, default_flow_style=None))


def read_supernet_doc(path) -> dict[str, Any]:
    import json

    from supernet import AdapterError, read_metadata

    meta = read_metadata(path)
    try:
        doc = json.loads(meta["noah"])
    except (KeyError, ValueError):
        raise AdapterError(f"{path}: not a NOAH supernet file (no '{NOAH_FORMAT}' description in its metadata)") from None
    if doc.get("format") != NOAH_FORMAT:
        raise AdapterError(f"{path}: not a NOAH supernet file (format {doc.get('format')!r}, expected {NOAH_FORMAT})")
    return doc


def load_supernet(model: nn.Module, path) -> nn.Module:
    """A fresh base ``model`` with the NOAH modules and tensors of ``path`` (strict: the file's keys
    are exactly the model's trainable ones)."""
    from supernet import AdapterError, read_safetensors, state_dict_mismatch

    doc = read_supernet_doc(path)
    apply_noah(model, doc["sizes"], str(path))
    tensors, _ = read_safetensors(path)
    own = {k: p for k, p in model.named_parameters() if p.requires_grad}
    problems = state_dict_mismatch(own, tensors)
    if problems:
        raise AdapterError(f"{path}: does not fit the model: {problems}")
    model.load_state_dict(tensors, strict=False)
    activate(model, doc["subnet"], str(path))
    return model
