"""Adapter (Houlsby et al. 2019, arXiv 1902.00751), in the form the NOAH and GLoRA papers compare
against on ViTs: one bottleneck after each block's MLP, inside the MLP's residual branch,

    m = MLP(LN2(x)),   x <- x + m + up(act(down(m)))

with down d->r and up r->d (both with bias), up zero at the start. The bottleneck module and the
ViT check are shared with AdaptFormer (methods/adaptformer.py); docs/methods/adapter.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import Method, MethodError, freeze_all_but_head, trainable_outside_head

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Bottleneck(nn.Module):
    """``scale · up(dropout(act(down(x))))``: down ``d -> r`` (LoRA-style Kaiming-uniform weight),
    up ``r -> d`` (zero), both biases zero, so the branch adds nothing before training."""

    def __init__(self, d: int, r: int, act: str, dropout: float, scale: float, like: torch.Tensor):
        super().__init__()
        kw = dict(device=like.device, dtype=like.dtype)
        self.down = nn.Linear(d, r, **kw)
        self.act = ACTIVATIONS[act]()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(r, d, **kw)
        self.scale = scale
        with torch.no_grad():  # shape-only on the meta device
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            for t in (self.down.bias, self.up.weight, self.up.bias):
                nn.init.zeros_(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.drop(self.act(self.down(x))))
        return y if self.scale == 1.0 else y * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class SequentialAdapterMlp(nn.Module):
    """A block's MLP followed by its adapter: ``m + adapter(m)`` with ``m = mlp(x)``; it takes the
    MLP's place, so the block's LayerScale and drop-path apply to the sum."""

    def __init__(self, mlp: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp(x)
        return m + self.adapter(m)


def vit_blocks(model: nn.Module, method: str) -> list[nn.Module]:
    """The pre-norm transformer blocks of a timm VisionTransformer, or a one-line MethodError."""
    from timm.models.vision_transformer import Block, VisionTransformer

    need = f"{method}: needs a timm VisionTransformer with pre-norm Blocks (norm2, mlp)"
    if not isinstance(model, VisionTransformer):
        raise MethodError(f"{need}; got {type(model).__name__}")
    blocks = list(model.blocks)
    other = sorted({type(b).__name__ for b in blocks if not isinstance(b, Block)})
    if other or not blocks:
        raise MethodError(f"{need}; got blocks of type {', '.join(other) or '(none)'}")
    if any(hasattr(b.mlp, "adapter") for b in blocks):
        raise MethodError(f"{method}: the model already holds an adapter")
    return blocks


def reference_weight(block: nn.Module, method: str) -> torch.Tensor:
    """A floating-point weight of the block's MLP: the device and dtype the new layers take."""
    for p in block.mlp.parameters():
        if p.dtype.is_floating_point:
            return p
    raise MethodError(f"{method}: the block's mlp ({type(block.mlp).__name__}) has no floating-point weight")


def check_dim(dim) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise MethodError(f"dim: the bottleneck width must be a positive integer, got {dim!r}")


def check_dropout(dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise MethodError(f"dropout: must be a number in [0, 1), got {dropout!r}")


@dataclass(frozen=True)
class AdapterSettings:
    dim: int = 8  # the bottleneck width r
    act: str = "gelu"  # the bottleneck's activation: gelu or relu
    dropout: float = 0.0  # on the bottleneck's activations, in training

    def __post_init__(self):
        check_dim(self.dim)
        if self.act not in ACTIVATIONS:
            raise MethodError(f"act: one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        check_dropout(self.dropout)


def _apply(model: nn.Module, s: AdapterSettings, space) -> nn.Module:
    blocks = vit_blocks(model, "adapter")
    freeze_all_but_head(model)
    d = model.embed_dim
    for block in blocks:
        block.mlp = SequentialAdapterMlp(block.mlp, Bottleneck(d, s.dim, s.act, float(s.dropout), 1.0,
                                                               reference_weight(block, "adapter")))
    return model


METHOD = Method(
    name="adapter",
    summary="a bottleneck d->r->d after every block's MLP (Houlsby et al. 2019)",
    config=AdapterSettings,
    apply=_apply,
    count=trainable_outside_head,
    merge=None,
    size="dim",
    inference="a bottleneck per block: two small matmuls (d->r, r->d) and an activation after each MLP",
)
