"""What the three stages ask of a weight-entangled supernet, for the two searched methods: GLoRA
(``supernet/``) and NOAH (``methods/noah.py``). The run's space says which: a NOAH space has
``method: noah``, any other space is GLoRA's. train.py samples a sub-network per step, search.py
evolves sub-networks (``search/``) under a parameter budget, retrain.py slices the chosen one out."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

import supernet as glora

from . import noah


class GloraSupernet:
    name = "glora"
    tensors = glora.TENSORS
    mergeable = True

    def __init__(self, space: Any):
        self.space = glora.load_space(space)

    def apply(self, model: nn.Module, lora_scaling: "glora.LoraScaling | None" = None, **options: Any) -> nn.Module:
        """``lora_scaling``: LoRA's scale of the low-rank tensors (train.lora / retrain.lora), None: 1;
        ``options``: the rest of :func:`supernet.apply_glora`'s layer options (engine/lorasetup.py)."""
        return glora.apply_glora(model, self.space, lora_scaling=lora_scaling, **options)

    def set_lora_scaling(self, model: nn.Module, lora_scaling: "glora.LoraScaling | None") -> None:
        glora.set_lora_scaling(model, lora_scaling)

    def choices(self, model: nn.Module) -> dict[str, dict[str, list[str]]]:
        return {n: {t: [str(c) for c in cs] for t, cs in per.items()} for n, per in glora.layer_choices(model).items()}

    def costs(self, model: nn.Module) -> dict:
        return glora.choice_costs(model)

    def sampler(self, model: nn.Module) -> Callable[[torch.Generator], Any]:
        return glora.SubnetSampler(model)

    def sample(self, model: nn.Module, generator: torch.Generator) -> Any:
        return glora.sample_subnet(model, generator, activate=False)

    def activate(self, model: nn.Module, config: Any) -> Any:
        return glora.set_subnet(model, config)

    def active(self, model: nn.Module) -> dict:
        return glora.subnet_to_dict(glora.get_subnet(model))

    def to_dict(self, config: Any) -> dict:
        """A configuration the sampler drew (parsed already: every training step tags one), as strings."""
        return glora.subnet_to_dict(config)

    def count(self, model: nn.Module, config: Any = None) -> int:
        return glora.count_params(model, config).adapter

    def extract(self, model: nn.Module, config: Any) -> nn.Module:
        config = glora.set_subnet(model, config)
        return glora.extract_subnet(model, config)

    def check_file(self, path) -> None:
        glora.load_subnet(path)

    def save(self, model: nn.Module, path, yaml_path, metadata: Mapping[str, Any]) -> None:
        glora.save_adapter(model, path, yaml_path, metadata=metadata)

    def metadata(self, path) -> dict:
        return glora.adapter_metadata(path)

    def load(self, model: nn.Module, path) -> nn.Module:
        return glora.load_adapter(model, path)

    def extremes(self, model: nn.Module) -> dict[str, dict]:
        layers = dict(glora.glora_layers(model))

        def pick(best):
            return {n: {t: str(best(layer.choices[t], key=lambda c: layer.choice_cost(t, c))) for t in glora.TENSORS}
                    for n, layer in layers.items()}
        return {"largest": pick(max), "smallest": pick(min)}


class NoahSupernet:
    name = "noah"
    tensors = noah.MODULES
    mergeable = False

    def __init__(self, space: Any):
        self.space = space if isinstance(space, noah.NoahSpace) else noah.load_noah_space(space)

    def apply(self, model: nn.Module, lora_scaling: None = None, **options: Any) -> nn.Module:
        if lora_scaling is not None or any(options.values()):  # the run config refuses them first
            raise noah.MethodError("lora: a NOAH supernet has no low-rank GLoRA tensors for the LoRA family's options")
        return noah.apply_noah(model, self.space.largest(), self.space.source)

    def set_lora_scaling(self, model: nn.Module, lora_scaling: None) -> None:
        if lora_scaling is not None:
            raise noah.MethodError("lora_alpha: a NOAH supernet has no low-rank GLoRA tensors to scale")

    def choices(self, model: nn.Module) -> dict:
        return noah.block_choices(model, self.space)

    def costs(self, model: nn.Module) -> dict:
        return noah.block_costs(model, self.space)

    def sampler(self, model: nn.Module) -> Callable[[torch.Generator], Any]:
        blocks = noah.noah_blocks(model)  # found once, as GLoRA's SubnetSampler finds its layers
        choices = {n: {m: list(self.space.choices[m]) for m in noah.MODULES} for n in blocks}

        def draw(generator: torch.Generator, activate: bool = True) -> dict:
            config = {n: dict(zip(noah.MODULES, picked)) for n, picked in
                      glora.draw_choices(choices, generator, noah.MODULES).items()}
            if activate:  # drawn from the space the blocks were sized for: nothing to validate
                for name, block in blocks.items():
                    block.activate(config[name])
            return config
        return draw

    def sample(self, model: nn.Module, generator: torch.Generator) -> Any:
        return self.sampler(model)(generator, activate=False)

    def activate(self, model: nn.Module, config: Any) -> Any:
        return noah.activate(model, _read(config))

    def active(self, model: nn.Module) -> dict:
        return {n: b.active for n, b in noah.noah_blocks(model).items()}

    def to_dict(self, config: Any) -> dict:
        return {n: {m: int(v) for m, v in per.items()} for n, per in _read(config).items()}

    def count(self, model: nn.Module, config: Any = None) -> int:
        return noah.config_cost(model, self.active(model) if config is None else _read(config))

    def extract(self, model: nn.Module, config: Any) -> nn.Module:
        return noah.extract(model, _read(config))

    def check_file(self, path) -> None:
        _read(path)

    def save(self, model: nn.Module, path, yaml_path, metadata: Mapping[str, Any]) -> None:
        noah.save_supernet(model, path, yaml_path, metadata)

    def metadata(self, path) -> dict:
        return dict(noah.read_supernet_doc(path).get("metadata") or {})

    def load(self, model: nn.Module, path) -> nn.Module:
        return noah.load_supernet(model, path)

    def extremes(self, model: nn.Module) -> dict[str, dict]:
        blocks = noah.noah_blocks(model)
        return {"largest": {n: self.space.largest() for n in blocks},
                "smallest": {n: {m: min(self.space.choices[m]) for m in noah.MODULES} for n in blocks}}


def _read(config: Any) -> Mapping:
    """A sub-network given as a mapping, or a YAML file (the search's result.yaml holds it under ``subnet``)."""
    import os
    from pathlib import Path

    import yaml

    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise noah.MethodError(f"{path}: cannot read the sub-network ({type(err).__name__})") from None
        config = data.get("subnet", data) if isinstance(data, Mapping) else data
        if not isinstance(config, Mapping):
            raise noah.MethodError(f"{path}: expected a mapping from block name to module sizes")
    return config


def parse_space(space: Any) -> "glora.SearchSpace | noah.NoahSpace":
    """A run's ``space`` (a path, a mapping or a parsed space), validated: a NOAH space when it says
    ``method: noah``, else GLoRA's. Raises ``SpaceError`` or ``MethodError`` with every problem."""
    if isinstance(space, (glora.SearchSpace, noah.NoahSpace)):
        return space
    raw = space
    if isinstance(space, str) or hasattr(space, "__fspath__"):
        import yaml
        from pathlib import Path

        try:
            raw = yaml.safe_load(Path(space).read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            raw = None  # GLoRA's loader reports the file's problem
    if noah.is_noah_space(raw):
        return noah.load_noah_space(raw, str(space) if not isinstance(space, Mapping) else "space")
    return glora.load_space(space)


def supernet_for(space: Any) -> GloraSupernet | NoahSupernet:
    """The supernet a run's space describes (a path, a mapping or a parsed space)."""
    parsed = parse_space(space)
    return NoahSupernet(parsed) if isinstance(parsed, noah.NoahSpace) else GloraSupernet(parsed)
