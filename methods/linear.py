"""Linear probing: only the new classifier trains."""

import torch.nn as nn

from .base import Method, NoSettings, freeze_all_but_head


def _apply(model: nn.Module, settings: NoSettings, space) -> nn.Module:
    freeze_all_but_head(model)
    return model


METHOD = Method(name="linear", summary="the classifier alone", config=NoSettings, apply=_apply,
                count=lambda m: 0, merge=lambda m: m)
