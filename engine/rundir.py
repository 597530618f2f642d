"""Run folders: a stage refuses to run into a folder that holds a run of a different configuration
(unless --overwrite), writes its config.yaml there, and removes the outputs an earlier run left.

What a stage's result depends on is its relevant config sections (:data:`STAGE_SECTIONS`), less
the keys that may change between a run and its resumption; :func:`fingerprint` digests them for
the checkpoints and states that must only be resumed by the same configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import yaml

from supernet import atomic_write_text

from . import distributed as dist
from .config import ConfigError, RunConfig
from .loraconfig import LoraOptions


# Which config sections each stage depends on: a finished stage refuses to be re-run into the
# same folder with different values there (a typo must never overwrite a finished run).
STAGE_SECTIONS = {
    "train": ("model", "data", "space", "train"),
    "search": ("model", "data", "space", "train", "search"),
    "retrain": ("model", "data", "space", "retrain"),
}
_VOLATILE = {"resume", "device", "compile", "compile_mode", "stop_at_step", "fail_at_step", "cache",
             "micro_batch_size", "grad_checkpointing"}  # may change between a run and its resumption


_LORA_DEFAULT = dataclasses.asdict(LoraOptions())

# Keys added after runs existed, with the value (given the whole config) that reproduces how such
# runs behaved: at that value a key is left out of fingerprints and comparisons, so those runs still
# resume; at another, it is a difference, and the refusal names the value that would resume them.
_ADDED_KEYS = {
    ("data", "normalize"): lambda cfg: "imagenet",
    ("search", "precision"): lambda cfg: (cfg.get("train") or {}).get("precision", "fp32"),  # scored in train's before
    ("train", "lora"): lambda cfg: _LORA_DEFAULT,  # LoRA's scale s = 1, and none of the family's options
    ("retrain", "lora"): lambda cfg: _LORA_DEFAULT,
}


# May differ between a run and its resumption because nothing done so far depends on them: a search
# resumed with more generations goes on where it stopped. (Not train.epochs: the schedule depends on it.)
_EXTENDABLE = {("search", "generations")}


def _as_before(cfg_dict: dict, section: str, key: str, value) -> bool:
    """``section.key`` is a key added later, at the value that reproduces how runs made before behaved."""
    if (section, key) not in _ADDED_KEYS:
        return False
    before = _ADDED_KEYS[section, key](cfg_dict)
    if isinstance(before, dict) and isinstance(value, dict):
        # a block that grew keys since (train.lora): a run written with fewer of them had the others at
        # their defaults, so it is "as before" when every key it has, and every key it lacks, is
        return set(value) <= set(before) and {**before, **value} == before
    return before == value


def relevant_config(cfg_dict: dict, stage: str, legacy: bool = False) -> dict:
    out = {}
    for section in STAGE_SECTIONS[stage]:
        value = cfg_dict.get(section)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items()
                     if k not in _VOLATILE and not _as_before(cfg_dict, section, k, v)
                     and (legacy or (section, k) not in _EXTENDABLE)}
        out[section] = value
    return out


def fingerprint(cfg: RunConfig, stage: str, legacy: bool = False) -> str:
    """A digest of what a stage's result depends on. ``legacy``: as computed before _EXTENDABLE keys
    were left out, which the states of runs started then carry. Either way a key added since
    (_ADDED_KEYS) is left out at the value that reproduces the runs made before it, so their digests
    still match at that value."""
    blob = json.dumps(relevant_config(cfg.to_dict(), stage, legacy), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def guard_output_dir(stage_dir: Path, cfg: RunConfig, stage: str, source: str, overwrite: bool) -> None:
    """Refuse to run into a folder that holds a run of a different configuration."""
    previous = stage_dir / "config.yaml"
    section = {"train": cfg.train, "retrain": cfg.retrain, "search": cfg.search}[stage]
    explicit_resume = section.resume not in ("auto", "never")  # the user named the checkpoint to continue
    if overwrite or explicit_resume or not previous.is_file():
        return
    try:
        old = yaml.safe_load(previous.read_text()) or {}
    except yaml.YAMLError:
        old = {}
    diffs = config_differences(relevant_config(old, stage), relevant_config(cfg.to_dict(), stage))
    if diffs:
        # a key the earlier run's config predates: name the value it ran with
        before = [f"{section}.{key}={_ADDED_KEYS[section, key](old)}" for section, key in _ADDED_KEYS
                  if f"{section}.{key}" in diffs[:5] and isinstance(old.get(section), dict) and key not in old[section]]
        hint = f"; it predates {', '.join(k.split('=')[0] for k in before)}: --set {' --set '.join(before)} resumes it" if before else ""
        raise ConfigError(source, [f"output_dir: {stage_dir} holds a {stage} run with a different configuration "
                                   f"({', '.join(diffs[:5])}){hint}; choose another output_dir or pass --overwrite"])


def config_differences(old: dict, new: dict) -> list[str]:
    """The keys (``section.key``, or a whole section) where two relevant configurations differ,
    compared as JSON would store them (a YAML round trip turns tuples into lists)."""
    old, new = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    diffs = []
    for section in new:
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(section)
    return diffs


def write_config(stage_dir: Path, cfg: RunConfig, info: dist.DistInfo) -> None:
    """The run config, as the stage runs it, into its folder (by the main process)."""
    if info.is_main:
        atomic_write_text(stage_dir / "config.yaml", cfg.to_yaml())


def remove_stale(folder: Path, names: tuple[str, ...], info: dist.DistInfo) -> None:
    """A stage starting afresh: the outputs an earlier run left in ``folder`` must not outlive it, or
    a run stopped now would leave them to the next stage (or to a reader) as this run's."""
    if info.is_main:
        for name in names:
            (folder / name).unlink(missing_ok=True)
