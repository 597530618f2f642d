"""Stage 3: retrain one sub-network (the search's, a given one, or a preset) from scratch or from
the supernet's slices, test it, and export it (retrain.py).

Writes ``adapter.safetensors`` and ``subnet.yaml``, then ``merged.safetensors`` once the merged
model is verified to predict as the unmerged one (:func:`supernet.write_merged`), and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from supernet import (GLoraLayer, atomic_write_text, get_subnet, head_params, merged_file_summary, save_adapter, set_dora,
                      subnet_to_dict, write_merged)

import methods
from methods.export import ADAPTED_FILE, forward_time_ratio, write_adapted

from .. import distributed as dist
from ..config import ConfigError, RunConfig, method_settings
from ..data import build_splits
from ..lorasetup import initialize_factors, layer_options, lora_hooks, prepare_offsets
from ..models import build_model, set_grad_checkpointing
from ..rng import seed_everything
from ..rundir import fingerprint, guard_output_dir, remove_stale, write_config
from ..tracker import Tracker
from ..trainer import ShardSampler, Trainer, evaluate
from .common import load_supernet, probe_input, warn_slow_precision

def prepare_retrain_model(cfg: RunConfig, num_classes: int, info: dist.DistInfo, source: str) -> tuple[nn.Module, str]:
    r = cfg.retrain
    if r.preset is not None:
        method, settings = method_settings(r)
        model = build_model(cfg.model, num_classes)
        if method.lora_scaling:  # the GLoRA-path presets (lora, ...) take retrain.lora
            method.apply(model, settings, cfg.search_space, **layer_options(r.lora))
        else:
            method.apply(model, settings, cfg.search_space)
        return model, r.preset
    subnet_path = Path(r.subnet) if r.subnet else Path(cfg.output_dir) / "search" / "result.yaml"
    if not subnet_path.is_file():
        hint = f" ({dist.SHARED_FS_HINT})" if info.enabled else ""
        raise ConfigError(source, [f"retrain.subnet: {subnet_path} not found; run search.py first, or set retrain.subnet or retrain.preset{hint}"])
    sn = cfg.supernet
    sn.check_file(subnet_path)  # a broken file stops here, before the supernet is loaded
    if r.init in ("supernet", "inherit"):
        model = load_supernet(cfg, num_classes, info, source, same_training=False, path=r.supernet).train()
        if r.init == "supernet":
            # retrain.lora, whatever scale the supernet was trained with (its file's): a new training from its slices
            sn.set_lora_scaling(model, r.lora.scaling())
    else:
        model = build_model(cfg.model, num_classes)
        sn.apply(model, **layer_options(r.lora))
    sn.extract(model, subnet_path)  # given the path, its errors name the file
    if r.lora.use_dora:  # a supernet trained without DoRA: magnitudes from the sub-network's own rows, same function
        set_dora(model, True)
    return model, str(subnet_path)


def method_of(cfg: RunConfig) -> methods.Method:
    """The method retrain.py trains: the preset, else the space's searched method (GLoRA or NOAH)."""
    return methods.get(cfg.retrain.preset or cfg.supernet.name)


def run_retrain(cfg: RunConfig, info: dist.DistInfo, source: str, overwrite: bool = False) -> str:
    out = Path(cfg.output_dir)
    rdir = out / "retrain"
    r = cfg.retrain
    guard_output_dir(rdir, cfg, "retrain", source, overwrite)
    seed_everything(r.seed)
    spec = probe_input(cfg)
    train_ds, test_ds, num_classes = build_splits(cfg.data, "final", *spec, cache=("train",))
    _, val_ds, _ = build_splits(cfg.data, "search", *spec, cache=())  # one batch, for the merge check
    model, origin = prepare_retrain_model(cfg, num_classes, info, source)
    prepare_offsets(model, r.lora)  # PiSSA, LoRA-GA: set before the first step, or by the checkpoint resumed
    if r.grad_checkpointing:
        set_grad_checkpointing(model, "retrain.grad_checkpointing")
    model.to(info.device)
    write_config(rdir, cfg, info)
    tracker = Tracker(rdir, enabled=info.is_main)
    warn_slow_precision(r.precision, "retrain.precision", info, tracker)
    # the retrained sub-network is part of what a checkpoint must match to resume: the searched one
    # (GLoRA's or NOAH's), or the one-choice sub-network of a preset run through GLoRA's layers
    active = (cfg.supernet.active(model) if r.preset is None else
              subnet_to_dict(get_subnet(model)) if any(isinstance(m, GLoraLayer) for m in model.modules()) else None)
    subnet = None if active is None else (hashlib.sha256(json.dumps(active, sort_keys=True).encode()).hexdigest()[:16], origin)
    method = method_of(cfg)
    hooks = lora_hooks(model, r.lora) if method.lora_scaling or method.name == "glora" else []
    if method.hooks is not None:  # AdaLoRA's penalty, importance and pruning
        hooks += method.hooks(model, method_settings(r)[1])
    trainer = Trainer(model, train_ds, None, r, rdir, info, tracker, fingerprint=fingerprint(cfg, "retrain"),
                      subnet=subnet, num_workers=cfg.data.num_workers, desc="retrain", hooks=hooks)
    if trainer.resume("never" if overwrite else r.resume):
        tracker.print(f"resumed from {trainer.ckpt_path} at epoch {trainer.epoch}, step {trainer.step}")
    else:
        remove_stale(rdir, ("merged.safetensors", ADAPTED_FILE, "metrics.json", "adapter.safetensors", "subnet.yaml"), info)
        started = initialize_factors(model, r.lora, train_ds, r.batch_size, r.seed, info)
        if started:
            tracker.print(started)
    n_adapter = method.count(model)
    n_head = head_params(model)
    tracker.print(f"retrain ({origin}): {n_adapter:,} adapter + {n_head:,} head parameters, "
                  f"{len(train_ds)} train / {len(test_ds)} test images, {trainer.total_steps} steps")
    trainer.install_signal_handlers()
    t0 = time.time()
    # inherit: the authors' protocol, the searched sub-network with the supernet's weights, not trained further
    status = "done" if r.init == "inherit" else trainer.fit()
    if status != "done":
        tracker.close()
        return status
    test_loader = torch.utils.data.DataLoader(test_ds, batch_size=r.eval_batch_size,
                                              sampler=ShardSampler(len(test_ds), info), num_workers=cfg.data.num_workers)
    topk = (1, 5) if num_classes > 5 else (1,)
    test = evaluate(model, test_loader, info, r.precision, topk=topk)
    if info.is_main:
        exported = export(model, cfg, rdir, val_ds, info, spec, num_classes)
        metrics = {
            "test_top1": test["top1"],
            **({"test_top5": test["top5"]} if "top5" in test else {}),
            "test_images": test["n"],
            "adapter_params": n_adapter,
            "head_params": n_head,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **exported,
            "method": method.name,
            "subnet": origin,
            "subnet_from_search": r.preset is None and not r.subnet,  # this output_dir's search/result.yaml
            "epochs": 0 if r.init == "inherit" else r.epochs,
            "init": "scratch" if r.preset is not None else r.init,
            "wall_time_s": round(time.time() - t0, 1),
        }
        atomic_write_text(rdir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        tracker.log(trainer.step, {"top1": test["top1"], **({"top5": test["top5"]} if "top5" in test else {})}, kind="test")
        tracker.print(f"test accuracy {test['top1']:.2f}% -> {rdir / 'metrics.json'}")
    tracker.close()
    dist.barrier()
    return "done"


def export(model: nn.Module, cfg: RunConfig, rdir: Path, val_ds, info: dist.DistInfo,
           spec: tuple[int, tuple[float, ...], tuple[float, ...]], num_classes: int) -> dict:
    """adapter.safetensors + subnet.yaml (GLoRA layers), then merged.safetensors once merged == unmerged
    is verified; a method that cannot merge writes adapted.safetensors and its inference cost instead.
    Returns what metrics.json records about the export."""
    model.eval()
    if any(isinstance(m, GLoraLayer) for m in model.modules()):
        save_adapter(model, rdir / "adapter.safetensors", rdir / "subnet.yaml",
                     metadata={"model": cfg.model.name, "kwargs": cfg.model.kwargs})
    x = next(iter(torch.utils.data.DataLoader(val_ds, batch_size=min(32, len(val_ds)))))[0].to(info.device)
    method = method_of(cfg)
    if not method.mergeable:
        settings = (method_settings(cfg.retrain)[1] if cfg.retrain.preset else
                    method.settings(blocks=cfg.supernet.active(model)))  # NOAH: the retrained sub-network
        write_adapted(model, rdir / ADAPTED_FILE, method, settings, cfg.search_space, cfg.model.name, cfg.model.kwargs, spec)
        base = build_model(dataclasses.replace(cfg.model, pretrained=False, checkpoint=None),
                           num_classes).to(info.device)
        return {"exported": ADAPTED_FILE, "model_params": sum(p.numel() for p in model.parameters()),
                "inference": method.inference, "inference_forward_ratio": forward_time_ratio(model, base, x)}
    gained = write_merged(model, rdir / "merged.safetensors", x, cfg.model.name, cfg.model.kwargs, spec, merge=method.merge)
    if gained and info.is_main:
        print(f"note: {len(gained)} layer(s) without a bias gained one in the merge (C or E chosen on them: "
              f"{', '.join(gained[:3])}{' ...' if len(gained) > 3 else ''}); {rdir / 'merged.safetensors'} loads into a "
              f"fresh model with supernet.load_merged(model, path), which adds them (evaluate.py does)", file=sys.stderr, flush=True)
    merged_total, merged_added = merged_file_summary(rdir / "merged.safetensors")
    return {"exported": "merged.safetensors", "merged_model_params": merged_total, "merged_added_biases": merged_added}
