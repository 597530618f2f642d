"""Full fine-tuning: every parameter trains."""

import torch.nn as nn

from .base import Method, NoSettings, freeze_all_but_head, trainable_outside_head


def _apply(model: nn.Module, settings: NoSettings, space) -> nn.Module:
    freeze_all_but_head(model)  # records the classifier's names (the head count)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


METHOD = Method(name="full", summary="every weight of the backbone and the classifier", config=NoSettings,
                apply=_apply, count=trainable_outside_head, merge=lambda m: m)
