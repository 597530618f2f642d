"""Methods that are one GLoRA choice per tensor (docs/method.md §2): LoRA, SSF, BitFit and the
prompt run through the GLoRA layers, so they count, merge and resume as a GLoRA sub-network does."""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from supernet import LoraScaling, SearchSpace, apply_glora, count_params, merge_glora

from .base import Method


def glora_preset(name: str, summary: str, config: type, choice: Callable[[Any], dict[str, str]], size: str | None = None) -> Method:
    """The method whose every targeted layer holds the one GLoRA choice ``choice(settings)``."""

    def apply(model: nn.Module, settings: Any, space: SearchSpace, lora_scaling: LoraScaling | None = None, **options: Any) -> nn.Module:
        """``lora_scaling``: LoRA's scale of the low-rank tensors (retrain.lora), None: 1; ``options``: the
        rest of :func:`supernet.apply_glora`'s layer options (the lora block: engine/lorasetup.py)."""
        return apply_glora(model, one_choice_space(space, choice(settings)), lora_scaling=lora_scaling, **options)

    return Method(name=name, summary=summary, config=config, apply=apply, count=lambda m: count_params(m).adapter,
                  merge=merge_glora, size=size, lora_scaling=True, glora_choice=choice)


def one_choice_space(space: SearchSpace, choice: dict[str, str]) -> dict:
    """``space``'s targets and exclusions, with the one choice per tensor (every linear layer where
    the run's space is not GLoRA's, as NOAH's)."""
    targets = getattr(space, "targets", "all-linear")
    targets = targets if isinstance(targets, str) else list(targets)
    return {"targets": targets, "exclude": list(getattr(space, "exclude", [])), "choices": {t: [c] for t, c in choice.items()}}
