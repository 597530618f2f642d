"""Visual Prompt Tuning (Jia et al. 2022, arXiv 2203.12119), both variants (docs/methods/vpt.md).

``vpt_shallow``: p learnable tokens enter after the prefix tokens (class/register/distillation) at
the first block's input, travel through every block and leave before the final norm.
``vpt_deep``: every block gets p fresh learnable tokens at its input and drops them at its output.

Each of the model's blocks is wrapped in a :class:`PromptedBlock` that inserts and/or removes the
tokens, so ``forward_features``, ``forward_head``, every global pool and timm's gradient
checkpointing run unchanged, and the final norm and the head see the base model's token layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Method, MethodError, freeze_all_but_head, trainable_outside_head


@dataclass(frozen=True)
class VptSettings:
    tokens: int = 10  # the prompt length p (retrain.rank)
    dropout: float = 0.0  # dropout on the prompt tokens as they enter a block

    def __post_init__(self):
        if not (isinstance(self.tokens, int) and not isinstance(self.tokens, bool) and self.tokens > 0):
            raise MethodError(f"tokens: must be a positive integer, got {self.tokens!r}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0 <= self.dropout < 1):
            raise MethodError(f"dropout: must be a number in [0, 1), got {self.dropout!r}")


class PromptedBlock(nn.Module):
    """A transformer block with VPT's token bookkeeping around it: ``prompt`` (p, d), if set, is
    inserted after the ``prefix`` leading tokens before the block; ``drop`` tokens after the prefix
    are removed from its output."""

    def __init__(self, block: nn.Module, prefix: int, prompt: nn.Parameter | None, drop: int, dropout: float):
        super().__init__()
        self.block = block
        self.prefix = prefix
        self.prompt = prompt
        self.drop = drop
        self.dropout = dropout

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        n = self.prefix
        if self.prompt is not None:
            tokens = self.prompt.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            tokens = F.dropout(tokens, self.dropout, self.training)
            x = torch.cat((x[:, :n], tokens, x[:, n:]), dim=1)
        x = self.block(x, *args, **kwargs)
        if self.drop:
            x = torch.cat((x[:, :n], x[:, n + self.drop:]), dim=1)
        return x

    def extra_repr(self) -> str:
        p = 0 if self.prompt is None else self.prompt.shape[0]
        return f"prefix={self.prefix}, inserts={p}, drops={self.drop}, dropout={self.dropout}"


def init_bound(model: nn.Module) -> float:
    """The paper's code draws prompts from U(-v, v), v = sqrt(6 / (fan_in + d)) (Xavier uniform) with
    fan_in = 3·patch², the patch embedding's inputs: taken here from its projection's weight (d if
    the model has none)."""
    d = model.embed_dim
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    weight = getattr(proj, "weight", None)
    fan_in = math.prod(weight.shape[1:]) if isinstance(weight, torch.Tensor) and weight.dim() > 1 else d
    return math.sqrt(6.0 / (fan_in + d))


def _check(model: nn.Module, name: str) -> None:
    blocks = getattr(model, "blocks", None)
    prefix, d = getattr(model, "num_prefix_tokens", None), getattr(model, "embed_dim", None)
    if not (isinstance(blocks, nn.Sequential) and len(blocks) and isinstance(prefix, int) and isinstance(d, int)):
        raise MethodError(f"{name} needs a timm VisionTransformer (blocks as nn.Sequential, num_prefix_tokens, "
                          f"embed_dim); got {type(model).__name__}")
    if any(isinstance(b, PromptedBlock) for b in blocks):
        raise MethodError(f"{name}: the model's blocks already carry VPT prompts")


def _apply(model: nn.Module, settings: VptSettings, space, deep: bool) -> nn.Module:
    _check(model, "vpt_deep" if deep else "vpt_shallow")
    freeze_all_but_head(model)
    blocks, p, d = model.blocks, settings.tokens, model.embed_dim
    ref = next(blocks.parameters(), None)
    if ref is None:
        ref = next(model.parameters())
    v = init_bound(model)
    last = len(blocks) - 1
    for i, block in enumerate(list(blocks)):
        prompt = None
        if deep or i == 0:
            prompt = nn.Parameter(torch.empty(p, d, device=ref.device, dtype=ref.dtype))
            nn.init.uniform_(prompt, -v, v)
        drop = p if (deep or i == last) else 0
        blocks[i] = PromptedBlock(block, model.num_prefix_tokens, prompt, drop, float(settings.dropout))
    return model


_COST = "compute of about (N+p)/N the base model's per block, attention's (N+p)²/N²; not mergeable"

VPT_SHALLOW = Method(
    name="vpt_shallow", summary="p learnable tokens after the prefix tokens at the first block's input",
    config=VptSettings, apply=partial(_apply, deep=False), count=trainable_outside_head, merge=None, size="tokens",
    inference=f"p prompt tokens (embed_dim·p values) carried through every block: {_COST}",
    starts_at_base=False, test_sizes=(1, 4))

VPT_DEEP = Method(
    name="vpt_deep", summary="p fresh learnable tokens after the prefix tokens at every block's input",
    config=VptSettings, apply=partial(_apply, deep=True), count=trainable_outside_head, merge=None, size="tokens",
    inference=f"p prompt tokens per block (depth·embed_dim·p values) through every block: {_COST}",
    starts_at_base=False, test_sizes=(1, 4))

METHODS = (VPT_SHALLOW, VPT_DEEP)
