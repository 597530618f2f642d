"""AdaptFormer (Chen et al. 2022, arXiv 2205.13535): a bottleneck parallel to each block's MLP,

    x <- x + MLP(LN2(x)) + s · up(ReLU(down(u)))

with u = x, the block's input to LN2, as the authors' released configuration has it (no norm on the
branch), or u = LN2(x) as the paper's equation writes it (``norm_input: true``). down d->r and
up r->d with bias; Kaiming-uniform down, zero up and biases; s = 0.1; dropout 0.1 on the
bottleneck in training. docs/methods/adaptformer.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .adapter import Bottleneck, check_dim, check_dropout, reference_weight, vit_blocks
from .base import Method, MethodError, freeze_all_but_head, trainable_outside_head


class ParallelAdapterMlp(nn.Module):
    """``mlp(norm(x)) + adapter(x)`` in a block's MLP slot. With the branch on the un-normed input
    the block's ``norm2`` moves in here as ``norm`` (the block's becomes the identity), so timm's
    forward runs unchanged; with ``norm_input`` the block keeps ``norm2`` and ``norm`` is the identity."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.norm = norm
        self.mlp = mlp
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x)) + self.adapter(x)


@dataclass(frozen=True)
class AdaptFormerSettings:
    dim: int = 8  # the bottleneck width r
    scale: float = 0.1  # s, the branch's fixed scale
    dropout: float = 0.1  # on the bottleneck's activations, in training
    norm_input: bool = False  # the branch reads LN2(x) (the paper's equation) instead of x (the released code)

    def __post_init__(self):
        check_dim(self.dim)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise MethodError(f"scale: must be a finite number, got {self.scale!r}")
        check_dropout(self.dropout)
        if not isinstance(self.norm_input, bool):
            raise MethodError(f"norm_input: must be true or false, got {self.norm_input!r}")


def _apply(model: nn.Module, s: AdaptFormerSettings, space) -> nn.Module:
    blocks = vit_blocks(model, "adaptformer")
    freeze_all_but_head(model)
    d = model.embed_dim
    for block in blocks:
        adapter = Bottleneck(d, s.dim, "relu", float(s.dropout), float(s.scale), reference_weight(block, "adaptformer"))
        if s.norm_input:
            block.mlp = ParallelAdapterMlp(nn.Identity(), block.mlp, adapter)
        else:
            block.mlp = ParallelAdapterMlp(block.norm2, block.mlp, adapter)
            block.norm2 = nn.Identity()
    return model


METHOD = Method(
    name="adaptformer",
    summary="a scaled bottleneck d->r->d parallel to every block's MLP (Chen et al. 2022)",
    config=AdaptFormerSettings,
    apply=_apply,
    count=trainable_outside_head,
    merge=None,
    size="dim",
    inference="a bottleneck per block: two small matmuls (d->r, r->d) and a ReLU beside each MLP",
)
