"""What a training option or a method adds to the training loop (engine/trainer.py calls these).

LoRA+ sets the optimizer's parameter groups, LoRA-Pro rewrites the factors' gradients before the
optimizer step, AdaLoRA adds a loss term, tracks importance after each step and prunes ranks.
Each is a :class:`TrainingHooks`; the trainer takes a list of them and calls, for every step:

    loss = criterion(...) + Σ extra_loss(model)        (per micro-batch, weighted by its share)
    backward; gradients averaged over ranks, unscaled (fp16), clipped
    after_backward(model, step)                          (the gradients the optimizer will use)
    optimizer.step()
    after_step(model, step, total_steps)                 (gradients still there; then zeroed)

The checkpoint holds every hook's ``state_dict()`` and a resumed run restores it before its first
step, so a hook with state (AdaLoRA's importance averages) resumes exactly. Every rank calls every
hook with the same (averaged) gradients: a hook must be deterministic so that ranks stay equal.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn


class TrainingHooks:
    """The no-op hooks; subclasses override what they need."""

    name = "hooks"

    def param_groups(self, named_params: Sequence[tuple[str, nn.Parameter]], lr: float, weight_decay: float) -> list[dict] | None:
        """The optimizer's parameter groups over ``named_params`` (the trainable ones), or None for one
        group. Each group's ``lr`` is its base rate: the scheduler scales every group by the same factor."""
        return None

    def check(self, total_steps: int) -> None:
        """Raise ValueError (one line) where the run cannot work with these hooks (AdaLoRA's schedule
        needs a pruning phase within ``total_steps``); the trainer calls it before training."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to every micro-batch's loss (a regulariser), or None."""
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called with the final gradients of ``step``, before the optimizer uses them."""

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after the optimizer step of ``step`` (0-based), before the gradients are zeroed."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def merged_param_groups(hooks: Sequence[TrainingHooks], named_params, lr: float, weight_decay: float) -> list[dict] | None:
    """The one hook's parameter groups (None where no hook sets them); two hooks setting them is an error."""
    found = [(h.name, g) for h in hooks if (g := h.param_groups(named_params, lr, weight_decay)) is not None]
    if len(found) > 1:
        raise ValueError(f"both {found[0][0]} and {found[1][0]} set the optimizer's parameter groups")
    return found[0][1] if found else None
