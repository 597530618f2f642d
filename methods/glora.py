"""GLoRA (docs/method.md): the supernet of ``supernet/`` over the run's space. As a method, its
settings are the space; train.py trains the supernet, search.py chooses the sub-network that
retrain.py (with ``retrain.preset: null``) retrains."""

import torch.nn as nn

from supernet import SearchSpace, apply_glora, count_params, merge_glora

from .base import Method, NoSettings


def _apply(model: nn.Module, settings: NoSettings, space: SearchSpace) -> nn.Module:
    return apply_glora(model, space)


METHOD = Method(name="glora", summary="the GLoRA supernet over the run's space (trained, searched, retrained)",
                config=NoSettings, apply=_apply, count=lambda m: count_params(m).adapter, merge=merge_glora,
                searched=True)
