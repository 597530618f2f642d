"""A benchmark track: one backbone (name, weights, input resolution, normalisation), its tasks
and groups, the methods that apply to it, and their learning-rate grids. The driver
(``run.Runner``) takes everything backbone- or task-specific from here, so the ViT replica
(``VIT`` below, ``python -m benchmarks.minivtab``) and the comparison's tracks
(``benchmarks/compare``) run through the same code.

A method spec is a dict:
  {"preset": NAME, "rank": R, "lora": {...}, "method_args": {...}, "model": {...}}   a retrain.py preset
  {"space": NAME, "budget": "loraR", "lora": {...}}        GLoRA: supernet -> search (<= budget) -> retrain
  {"space": NAME, "budget": ..., "select_lora": [option, ...]}
        GLoRA with whichever LoRA-family option (or none) scores best on val200 (the lr selection's best)
  GLoRA keys: "base": M (built on method M's runs), "inherit": True (M's searched sub-network with the
  supernet's weights, not retrained), "supernet_x": k (the supernet trained k x the epochs),
  "tasks": [...] (run on these tasks only: an ablation)
``lora`` is the ``lora:`` block (docs/lora-family.md) of train (GLoRA's supernet) and retrain;
``model`` overrides model-config keys for that method only.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
SPACES = REPO / "configs" / "space"


@dataclass(frozen=True)
class Track:
    name: str
    model_name: str
    model_kwargs: dict
    # the weights: a callable so that the ViT replica's backbone is pre-trained (or found in its
    # cache) only when a run starts, never when the track is merely imported or listed
    checkpoint: Callable[[], str]
    groups: dict[str, list[str]]
    num_classes: dict[str, int]
    methods: dict[str, dict]
    img_size: int | None = None          # None: the backbone's own (the ViT's img_size)
    normalize: str = "imagenet"
    head_init: str = "timm"
    targets: str | None = None           # None: each space file's own targets; else it replaces them
    preset_space: str = "large"          # the space whose targets the layer-wise presets adapt
    lr_grids: dict[str, list[float]] = field(default_factory=dict)
    default_grid: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    fewshot_dataset: str = "digits"      # the few-shot phase's dataset; its lr comes from this vtab task
    supernet_lr: float | None = None     # GLoRA's (and NOAH's) supernet lr; None: the middle of the grid
    dg_domains: tuple[str, ...] = ("inverted", "edges", "blurred")

    @property
    def tasks(self) -> list[str]:
        return [t for ts in self.groups.values() for t in ts]

    def space(self, name: str) -> str | dict:
        """A space for the run config: the file's path, or, where the track replaces the targets (a
        CNN's convolutions), the file's choices inline with the track's targets."""
        path = SPACES / f"{name}.yaml"
        if self.targets is None or name == "noah":
            return str(path)
        doc = yaml.safe_load(path.read_text())
        doc["targets"] = self.targets
        return doc

    def grid(self, method: str, size: int) -> list[float]:
        """``size`` values of the method's lr grid: 1 -> the middle, 2 -> the two edges, 3 -> all."""
        spec = self.methods.get(method, {})
        g = list(self.lr_grids.get(spec.get("lr_grid", method), self.default_grid))
        return g if size >= len(g) else g[1:1 + size] if size == 1 else [g[0], g[-1]] if size == 2 else g

    def model_config(self, checkpoint: str | None = None, overrides: dict | None = None) -> dict:
        d = {"name": self.model_name, "checkpoint": checkpoint, "kwargs": dict(self.model_kwargs),
             "drop_path_rate": 0.0, "head_init": self.head_init}
        d.update(overrides or {})
        return d

    def data_config(self, data: dict) -> dict:
        d = dict(data, normalize=self.normalize)
        if self.img_size is not None:
            d["img_size"] = self.img_size
        return d

    def lora_count(self, rank: int, num_classes: int = 10) -> int:
        """The ``lora`` preset's adapter parameters at ``rank`` on this backbone: the budgets GLoRA's
        search is held to."""
        s = self.space(self.preset_space)
        doc = yaml.safe_load(Path(s).read_text()) if isinstance(s, str) else s
        return _lora_count(self.model_name, tuple(sorted(self.model_kwargs.items())), yaml.safe_dump(doc, sort_keys=True),
                           rank, num_classes)


@functools.lru_cache(maxsize=None)
def _lora_count(model_name: str, kwargs: tuple, space_yaml: str, rank: int, num_classes: int) -> int:
    import timm

    import methods
    from supernet import load_space

    m = timm.create_model(model_name, num_classes=num_classes, **dict(kwargs))
    lora = methods.get("lora")
    lora.apply(m, lora.settings(size=rank), load_space(yaml.safe_load(space_yaml)))
    return lora.count(m)


def spec_lora(spec: dict) -> dict[str, dict]:
    """The ``lora:`` blocks of a method spec for train (the supernet) and retrain. An init option
    (PiSSA, LoRA-GA) sets the supernet's start; a GLoRA retrain from the supernet inherits the
    factors (the config check refuses an init option with ``retrain.init: supernet``)."""
    lora = dict(spec.get("lora") or {})
    retrain = copy.deepcopy(lora)
    if "space" in spec:
        retrain.pop("init_lora_weights", None)
        retrain.pop("lora_ga_batches", None)
    return {"train": lora, "retrain": retrain}


# ---------------------------------------------------------------------------- the ViT replica
def _vit_checkpoint() -> str:
    from .pretrain import pretrain

    return str(pretrain())


def vit_track(methods: dict[str, dict], name: str = "vit") -> Track:
    from . import MODEL_KWARGS, MODEL_NAME
    from .prepare import GROUPS, NUM_CLASSES

    return Track(name=name, model_name=MODEL_NAME, model_kwargs=dict(MODEL_KWARGS), checkpoint=_vit_checkpoint,
                 groups=GROUPS, num_classes=NUM_CLASSES, methods=methods, lr_grids={"full": [1e-4, 3e-4, 1e-3]})


def describe(spec: dict[str, Any]) -> str:
    """One line for a method spec (docs and the driver's log)."""
    if "space" in spec:
        extra = f", LoRA-family option chosen on val200 from {spec['select_lora']}" if spec.get("select_lora") else ""
        extra += f" (those that beat plain {spec['screen']} there)" if spec.get("screen") else ""
        extra += f", {spec['base']}'s sub-network with the supernet's weights, not retrained" if spec.get("inherit") else ""
        extra += f", supernet {spec['supernet_x']}x the epochs" if spec.get("supernet_x") else ""
        extra += f", on {'/'.join(spec['tasks'])} only" if spec.get("tasks") else ""
        lora = f", lora {spec['lora']}" if spec.get("lora") else ""
        return f"GLoRA {spec['space']} space, budget <= {spec['budget']}{lora}{extra}"
    parts = [spec["preset"]] + ([f"rank {spec['rank']}"] if "rank" in spec else [])
    parts += [f"lora {spec['lora']}"] if spec.get("lora") else []
    parts += [f"method_args {spec['method_args']}"] if spec.get("method_args") else []
    parts += [f"model {spec['model']}"] if spec.get("model") else []
    return ", ".join(parts)
