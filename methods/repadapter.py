"""RepAdapter (Luo et al. 2023, arXiv 2302.08106): a linear adapter x' = x + s·up(down(x)) on the
input of every ViT block's qkv projection and MLP fc1; ``down`` is dense d→h, ``up`` is grouped
h→d (g groups of h/g → d/g), both with biases. Being linear, it folds into the layer it feeds:
W·(x + s(U(Dx + b_d) + b_u)) + b = W(I + sUD)·x + (b + s·W(U b_d + b_u)), so the merge returns the
plain timm ViT (docs/methods/repadapter.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from supernet import set_submodule

from .base import Method, MethodError, freeze_all_but_head, trainable_outside_head


@dataclass(frozen=True)
class RepAdapterSettings:
    dim: int = 8  # the hidden width h (retrain.rank)
    groups: int = 2  # groups of the up-projection; divides dim and the model's width
    scale: float = 1.0  # s, tuned per task in the paper
    dropout: float = 0.1  # on the hidden activation while training (the authors' value)

    def __post_init__(self):
        if not (isinstance(self.dim, int) and not isinstance(self.dim, bool) and self.dim > 0):
            raise MethodError(f"dim: must be a positive integer, got {self.dim!r}")
        if not (isinstance(self.groups, int) and not isinstance(self.groups, bool) and self.groups > 0):
            raise MethodError(f"groups: must be a positive integer, got {self.groups!r}")
        if self.dim % self.groups:
            raise MethodError(f"groups: must divide dim (retrain.rank), got groups={self.groups}, dim={self.dim}")
        if not (isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool)
                and math.isfinite(self.scale) and self.scale != 0):
            raise MethodError(f"scale: must be a finite non-zero number, got {self.scale!r}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0 <= self.dropout < 1):
            raise MethodError(f"dropout: must be a number in [0, 1), got {self.dropout!r}")


class RepAdapterLinear(nn.Module):
    """``base(x + s·up(dropout(down(x))))``: a frozen Linear fed through a RepAdapter.

    ``up_weight`` holds the grouped up-projection as (d, h/g): output rows d/g·k … d/g·(k+1) of group k
    read hidden units h/g·k … h/g·(k+1) (a grouped 1×1 convolution's layout). A base layer without a
    bias gets an adapter without biases, so that the merge needs none."""

    def __init__(self, base: nn.Linear, dim: int, groups: int, scale: float, dropout: float):
        super().__init__()
        d = base.in_features
        w = base.weight
        self.base = base
        self.groups, self.scale = groups, float(scale)
        bias = base.bias is not None
        self.down = nn.Linear(d, dim, bias=bias, device=w.device, dtype=w.dtype)
        self.up_weight = nn.Parameter(torch.zeros(d, dim // groups, device=w.device, dtype=w.dtype))
        self.up_bias = nn.Parameter(torch.zeros(d, device=w.device, dtype=w.dtype)) if bias else None
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.down.weight)  # the authors' initialisation; up = 0: starts as the base layer
        if self.down.bias is not None:
            nn.init.zeros_(self.down.bias)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """s·up(dropout(down(x))), the adapter's addition to x."""
        g = self.groups
        z = self.dropout(self.down(x))
        z = z.unflatten(-1, (g, -1))  # (..., g, h/g)
        u = self.up_weight.unflatten(0, (g, -1))  # (g, d/g, h/g)
        out = torch.einsum("...gi,goi->...go", z, u).flatten(-2)
        if self.up_bias is not None:
            out = out + self.up_bias
        return self.scale * out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x + self.adapter(x))

    def dense_up(self) -> torch.Tensor:
        """The up-projection as a dense (d, h) block-diagonal matrix."""
        g = self.groups
        blocks = self.up_weight.unflatten(0, (g, -1))  # (g, d/g, h/g)
        return torch.block_diag(*blocks.unbind(0))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain Linear computing this module's function (in eval mode), folded in float64."""
        w0 = self.base.weight
        W = w0.double()
        U, D = self.dense_up().double(), self.down.weight.double()
        A = torch.eye(W.shape[1], dtype=torch.float64, device=W.device) + self.scale * (U @ D)
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=w0.device, dtype=w0.dtype)
        out.weight.copy_((W @ A).to(w0.dtype))
        if self.base.bias is not None:
            c = self.scale * (U @ self.down.bias.double() + self.up_bias.double())
            out.bias.copy_((self.base.bias.double() + W @ c).to(w0.dtype))
        out.weight.requires_grad_(w0.requires_grad)
        if out.bias is not None:
            out.bias.requires_grad_(self.base.bias.requires_grad)
        return out


def _targets(model: nn.Module) -> list[str]:
    """Names of the Linear layers RepAdapter feeds: every block's attn.qkv and mlp.fc1."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise MethodError(f"repadapter needs a timm VisionTransformer (blocks with attn.qkv and mlp.fc1), "
                          f"got {type(model).__name__}")
    names = []
    for i, block in enumerate(model.blocks):
        for path in ("attn.qkv", "mlp.fc1"):
            try:
                layer = block.get_submodule(path)
            except AttributeError:
                layer = None
            if not isinstance(layer, nn.Linear):
                raise MethodError(f"repadapter needs a Linear {path} in every ViT block, got "
                                  f"{type(layer).__name__ if layer is not None else 'none'} in blocks.{i} "
                                  f"({type(block).__name__})")
            names.append(f"blocks.{i}.{path}")
    return names


def _apply(model: nn.Module, settings: RepAdapterSettings, space) -> nn.Module:
    targets = _targets(model)
    width = model.get_submodule(targets[0]).in_features
    if width % settings.groups:
        raise MethodError(f"groups: must divide the model's width, got groups={settings.groups}, width={width}")
    freeze_all_but_head(model)
    for name in targets:
        set_submodule(model, name, RepAdapterLinear(model.get_submodule(name), settings.dim, settings.groups,
                                                    settings.scale, settings.dropout))
    for module in model.modules():
        if isinstance(module, RepAdapterLinear):
            for pname, p in module.named_parameters():
                p.requires_grad_(not pname.startswith("base."))
    return model


def _merge(model: nn.Module) -> nn.Module:
    names = [n for n, m in model.named_modules() if isinstance(m, RepAdapterLinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).merged())
    return model


METHOD = Method(name="repadapter", summary="a linear adapter (dense down, grouped up) before every qkv and fc1, folded into them",
                config=RepAdapterSettings, apply=_apply, count=trainable_outside_head, merge=_merge, size="dim",
                starts_at_base=True, test_sizes=(2, 4))
