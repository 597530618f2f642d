"""Stage 1: train the supernet (GLoRA's, or NOAH's for a NOAH space), one random sub-network per
step (train.py).

Writes ``supernet.safetensors`` and ``supernet.yaml`` into ``output_dir`` once training is done.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from supernet import head_params

from .. import distributed as dist
from ..config import RunConfig
from ..data import build_splits
from ..lorasetup import initialize_factors, layer_options, lora_hooks, prepare_offsets
from ..models import build_model, set_grad_checkpointing
from ..rng import seed_everything, step_generator
from ..rundir import fingerprint, guard_output_dir, relevant_config, remove_stale, write_config
from ..tracker import Tracker
from ..trainer import Trainer, evaluate
from .common import probe_input, warn_slow_precision


def reference_subnets(sn, model: nn.Module, seed: int, n_random: int) -> dict[str, Any]:
    """The largest and smallest sub-networks plus ``n_random`` fixed random ones."""
    refs = sn.extremes(model)
    for i in range(n_random):
        refs[f"random{i}"] = sn.sample(model, step_generator(seed, i, stream=1))
    return refs


def subnet_tag(sn, config) -> int:
    """A short stable hash of a configuration, logged per step and compared across ranks."""
    text = json.dumps(sn.to_dict(config), sort_keys=True)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def run_train(cfg: RunConfig, info: dist.DistInfo, source: str, overwrite: bool = False) -> str:
    out = Path(cfg.output_dir)
    t = cfg.train
    guard_output_dir(out, cfg, "train", source, overwrite)
    seed_everything(t.seed)
    train_ds, val_ds, num_classes = build_splits(cfg.data, "search", *probe_input(cfg))
    model = build_model(cfg.model, num_classes)
    sn = cfg.supernet
    sn.apply(model, **layer_options(t.lora))
    if t.grad_checkpointing:
        set_grad_checkpointing(model, "train.grad_checkpointing")
    prepare_offsets(model, t.lora)  # PiSSA, LoRA-GA: set before the first step, or by the checkpoint resumed
    model.to(info.device)
    write_config(out, cfg, info)
    tracker = Tracker(out, enabled=info.is_main)
    warn_slow_precision(t.precision, "train.precision", info, tracker)
    refs = reference_subnets(sn, model, t.seed, t.reference_subnets)

    sampler = sn.sampler(model)

    def before_step(step: int) -> int:
        config = sampler(step_generator(t.seed, step))
        return subnet_tag(sn, config)

    trainer = Trainer(model, train_ds, val_ds, t, out, info, tracker, before_step=before_step,
                      fingerprint=fingerprint(cfg, "train"), num_workers=cfg.data.num_workers, desc="supernet",
                      hooks=lora_hooks(model, t.lora))

    def on_eval(epoch: int, step: int) -> dict[str, float]:
        scores = {}
        for name, ref in refs.items():
            sn.activate(model, ref)
            scores[f"acc_{name}"] = evaluate(model, trainer.eval_loader, info, t.precision)["top1"]
        return scores

    trainer.on_eval = on_eval
    if trainer.resume("never" if overwrite else t.resume):
        tracker.print(f"resumed from {trainer.ckpt_path} at epoch {trainer.epoch}, step {trainer.step}")
    else:
        remove_stale(out, ("supernet.safetensors", "supernet.yaml"), info)  # else search.py could search it
        started = initialize_factors(model, t.lora, train_ds, t.batch_size, t.seed, info)
        if started:
            tracker.print(started)
    tracker.print(f"supernet ({sn.name}): {len(refs['largest'])} adapted layers, {sum(p.numel() for p in trainer.params):,} trainable "
                  f"tensors' parameters (largest sub-network {sn.count(model, refs['largest']):,} adapter + "
                  f"{head_params(model):,} head), "
                  f"{len(train_ds)} train / {len(val_ds)} val images, {trainer.total_steps} steps")
    trainer.install_signal_handlers()
    status = trainer.fit()
    if status == "done" and info.is_main:
        sn.save(model, out / "supernet.safetensors", out / "supernet.yaml",
                metadata={"model": cfg.model.name, "num_classes": num_classes, "space": cfg.search_space.to_dict(),
                          "config": relevant_config(cfg.to_dict(), "train")})
        tracker.print(f"supernet written to {out / 'supernet.safetensors'}")
    tracker.close()
    dist.barrier()
    return status

