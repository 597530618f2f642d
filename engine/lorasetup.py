"""The ``lora:`` block at run time (docs/lora-family.md): how the GLoRA layers are built for it,
the training hooks it adds (LoRA+, LoRA-Pro), and the data-aware start of the factors (PiSSA,
LoRA-GA) that a run makes once, before its first step (a resumed run gets them from its checkpoint)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from methods.hooks import TrainingHooks
from methods.lorafamily.training import lora_training_hooks

from . import distributed as dist
from .loraconfig import LoraOptions


def layer_options(lora: LoraOptions) -> dict[str, Any]:
    """What :func:`supernet.apply_glora` takes for ``lora``: LoRA's scale, own parameters for vector
    and scalar choices under LoRA+ (so they do not learn at its ratio), DoRA's magnitudes."""
    return {"lora_scaling": lora.scaling(), "vector_params": lora.loraplus_lr_ratio is not None, "use_dora": lora.use_dora}


def prepare_offsets(model: nn.Module, lora: LoraOptions) -> None:
    """The frozen initial factors PiSSA or LoRA-GA will set, before a checkpoint is resumed (which
    holds their values): :func:`methods.lorafamily.apply.prepare_offsets`."""
    if lora.init_lora_weights != "default":
        from methods.lorafamily import apply as lora_init

        lora_init.prepare_offsets(model, lora.init_lora_weights)


def lora_hooks(model: nn.Module, lora: LoraOptions) -> list[TrainingHooks]:
    return lora_training_hooks(model, lora.loraplus_lr_ratio, lora.lora_pro)


def estimate_batches(train_ds: Dataset, batch_size: int, n_batches: int, seed: int, info: dist.DistInfo) -> DataLoader:
    """``n_batches`` batches of this rank's share of a fixed random order of ``train_ds`` (its own
    generator: the run's random state is not touched, so a resumed run, which skips this, continues
    as an uninterrupted one)."""
    order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed + 7919))
    take = order[: n_batches * batch_size * info.world_size][info.rank::info.world_size]
    return DataLoader(Subset(train_ds, take.tolist()), batch_size=batch_size, shuffle=False)


def initialize_factors(model: nn.Module, lora: LoraOptions, train_ds: Dataset, batch_size: int, seed: int,
                       info: dist.DistInfo) -> str | None:
    """PiSSA or LoRA-GA start of the low-rank factors (``init_lora_weights``); returns the line to print, or None."""
    if lora.init_lora_weights == "default":
        return None
    from methods.lorafamily import apply as lora_init

    with torch.random.fork_rng(devices=[info.device] if info.device.type == "cuda" else []):
        torch.manual_seed(seed)  # svd_lowrank's random projections; the run's own random state is restored after
        if lora.init_lora_weights == "pissa":
            return str(lora_init.init_pissa(model))
        loader = estimate_batches(train_ds, batch_size, lora.lora_ga_batches, seed, info)
        device = next(model.parameters()).device
        batches = ((x.to(device), y.to(device)) for x, y in loader)
        reduce = (lambda t: dist.all_reduce_sum(t).div_(info.world_size)) if info.enabled else None
        grads = lora_init.estimate_weight_grads(model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), reduce=reduce)
        return str(lora_init.init_lora_ga(model, grads))
