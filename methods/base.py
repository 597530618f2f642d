"""What a fine-tuning method is to the pipeline: a settings dataclass, a function that adds the
method to a model and freezes the rest, its trainable-parameter count, and its merge into the
plain model where the method reparameterises exactly.

A method lives in one module of this package that defines ``METHOD = Method(...)``; the registry
(``methods/__init__.py``) lists the modules. ``retrain.py --set retrain.preset=<name>`` trains it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch.nn as nn

from supernet import SearchSpace, classifier_names


class MethodError(ValueError):
    """A method's settings are invalid, or the method does not fit the model (one line)."""


@dataclass(frozen=True)
class Method:
    """One registered method.

    ``config`` is a dataclass of its settings, validated in ``__post_init__`` (raise
    :class:`MethodError`); the run config fills its ``size`` field from ``retrain.rank`` and the
    others from ``retrain.method_args``. ``apply(model, settings, space)`` changes ``model`` in
    place: it adds the method's parameters (the adapted model computes the base model's output at
    step 0 where the method allows it), leaves them and the classifier trainable and freezes the
    rest; ``space`` is the run's GLoRA space, whose ``targets``/``exclude`` the layer-wise methods
    adapt. ``count(model)`` is the number of the method's own trainable parameters, head excluded.
    ``merge(model)`` returns the plain architecture computing the same function (it may change
    ``model``), or is None where the method cannot merge; ``inference`` then says what it adds.
    """

    name: str
    summary: str
    config: type
    apply: Callable[[nn.Module, Any, SearchSpace], nn.Module]
    count: Callable[[nn.Module], int]
    merge: Callable[[nn.Module], nn.Module] | None
    size: str | None = None
    inference: str = "nothing: merged into the plain model"
    # Whether the adapted model computes the base model's output before training (VPT's prompts cannot)
    starts_at_base: bool = True
    # Trained as a supernet and searched (train.py, search.py) before retrain.py: not a retrain.preset
    searched: bool = False
    # Made of GLoRA layers whose low-rank tensors take LoRA's scale (retrain.lora; supernet.set_lora_scaling)
    lora_scaling: bool = False
    # A method that is one GLoRA choice per tensor: choice(settings) -> {"A": "none", "B": "lora4", ...}
    glora_choice: Callable[[Any], dict[str, str]] | None = None
    # What the method adds to the training loop: hooks(model, settings) -> [methods.hooks.TrainingHooks]
    # (AdaLoRA's penalty, importance and pruning); None: nothing
    hooks: Callable[[nn.Module, Any], list] | None = None
    # Sizes the test matrix tries on its 2-block, 32-wide ViT (tests/test_methods.py)
    test_sizes: tuple[int, ...] = (2,)

    def settings(self, size: int | None = None, **args: Any) -> Any:
        """The method's settings: ``size`` for its size field, the rest by name."""
        if self.size is not None and size is not None:
            args[self.size] = size
        return self.config(**args)

    @property
    def mergeable(self) -> bool:
        return self.merge is not None

    def arg_names(self) -> list[str]:
        """The settings ``retrain.method_args`` may hold (the size field comes from ``retrain.rank``)."""
        return [f.name for f in fields(self.config) if f.name != self.size]


@dataclass(frozen=True)
class NoSettings:
    """A method with nothing to set."""


def freeze_all_but_head(model: nn.Module) -> list[str]:
    """Freeze every parameter but the classifier's; returns the classifier's module names, which
    are also recorded on the model (``glora_modules_to_save``) for the trainer, the head count and
    the adapter files."""
    heads = classifier_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(h + ".") for h in heads))
    model.glora_modules_to_save = heads
    return heads


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(h + "." for h in getattr(model, "glora_modules_to_save", None) or classifier_names(model))


def trainable_outside_head(model: nn.Module) -> int:
    """Trainable parameters outside the classifier: the count of a method whose parameters are exactly those."""
    heads = head_prefixes(model)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith(heads))
