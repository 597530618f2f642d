"""What more than one recipe (and evaluate.py) needs before it runs: the data config and input
spec of a run config, the trained supernet of a run, and the warning about fp16 on a CPU."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .. import distributed as dist
from ..config import ConfigError, RunConfig
from ..models import build_model
from ..rundir import config_differences, relevant_config
from ..tracker import Tracker


def probe_input(cfg: RunConfig) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """The square input size (data.img_size, else the backbone's), and the mean/std images are
    normalised with (data.normalize)."""
    from ..preflight import input_spec, meta_model

    size, mean, std = input_spec(meta_model(cfg.model, 0), cfg.data.normalize)
    return cfg.data.img_size or size, mean, std


def warn_slow_precision(precision: str, key: str, info: dist.DistInfo, tracker: Tracker) -> None:
    """fp16 is a GPU format: most CPUs have no fp16 matrix units, and PyTorch's fallback there is
    two orders of magnitude slower than fp32 (2.0 s against 11 ms for a 1024² product on this
    machine's AVX-512 CPU, where bf16 takes 2.7 ms)."""
    if precision == "fp16" and info.device.type == "cpu":
        tracker.print(f"warning: {key}: fp16 on a CPU usually runs far slower than fp32 (no fp16 matrix units); bf16 or fp32 is the choice there")


def load_supernet(cfg: RunConfig, num_classes: int, info: dist.DistInfo, source: str, same_training: bool = True,
                  path: str | None = None) -> nn.Module:
    """The trained supernet of ``cfg.output_dir`` (or the file ``path``). Refused when the run config
    no longer describes it: the search (``same_training``) needs the model, data, space and train
    sections it was trained with; retraining from its slices needs only its space (the model must fit
    its tensors)."""
    key = "retrain.supernet" if path else "output_dir"
    path = Path(path) if path else Path(cfg.output_dir) / "supernet.safetensors"
    if not path.is_file():
        hint = f" ({dist.SHARED_FS_HINT})" if info.enabled else ""
        raise ConfigError(source, [f"{key}: {path}: no trained supernet; run train.py with this config first{hint}"])
    # The supernet comes from the file: a config changed since train.py (its space above all, whose
    # choices the file's layers would silently keep) would describe a supernet that was never trained.
    sn = cfg.supernet
    meta = sn.metadata(path)
    if same_training and "config" in meta:
        diffs = config_differences(meta["config"], relevant_config(cfg.to_dict(), "train"))
    else:  # retraining, or a file written before the metadata held the whole configuration
        diffs = ["space"] if "space" in meta and meta["space"] != cfg.search_space.to_dict() else []
    if diffs:
        raise ConfigError(source, [f"{key}: {path} was trained with another configuration ({', '.join(diffs[:5])}; "
                                   f"see its metadata in supernet.yaml): run train.py with this one, or set those keys back"])
    model = build_model(cfg.model, num_classes)
    sn.load(model, path)
    return model.to(info.device).eval()

