"""Model surgery: wrap targeted ``nn.Linear`` and ``nn.Conv2d`` layers in GLoRA layers, and act on whole networks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from .conv import GLoraConv2d, conv_problem
from .layer import GLoraLayer, GLoraLinear
from .plans import LoraScaling
from .space import TARGET_KINDS, TENSORS, LayerChoice, SearchSpace, SpaceError, any_match, load_space, pattern_matches
from .subnet import Subnet, load_subnet, sample_config


def classifier_names(model: nn.Module) -> list[str]:
    """Names of a timm model's classifier(s) (``get_classifier``; distilled DeiT has two)."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return []
    try:
        heads = get()
    except Exception:  # some wrappers raise when the head is removed
        return []
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    heads = [h for h in heads if isinstance(h, nn.Module) and any(True for _ in h.parameters())]
    return [name for name, module in model.named_modules() if any(module is h for h in heads)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``, in place of what is there."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _preview(names: list[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "") if names else "(none)"


def _adaptable_problem(module: nn.Module) -> str | None:
    """Why ``module`` cannot be a GLoRA target (one line), or None: an nn.Linear or a supported nn.Conv2d."""
    if isinstance(module, GLoraLayer):
        return "already a GLoRA layer; apply_glora once per model"
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        return conv_problem(module)
    return f"a {type(module).__name__}, not an nn.Linear or nn.Conv2d"


def find_targets(model: nn.Module, space: SearchSpace) -> list[str]:
    """Names of the modules ``space`` targets, validated: every pattern matches, every match is a
    Linear or a Conv2d GLoRA can adapt. ``targets: all-linear`` (the default), ``all-conv`` or ``all``
    take every such layer outside ``exclude`` and the classifier."""
    modules = dict(model.named_modules())
    modules.pop("", None)
    heads = classifier_names(model)
    excluded = {n for n in modules if any_match(space.exclude, n)}
    excluded |= {n for n in modules for h in heads if n == h or n.startswith(h + ".")}
    linear_names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if isinstance(space.targets, str):
        kinds = TARGET_KINDS[space.targets]
        types = tuple(t for k, t in (("linear", nn.Linear), ("conv", nn.Conv2d)) if k in kinds)
        names = [n for n, m in modules.items() if isinstance(m, types) and n not in excluded]
        if not names:
            listed = _preview(linear_names) if kinds == ("linear",) else _preview([n for n, m in modules.items() if isinstance(m, types)])
            what = " or ".join(t.__name__ for t in types)
            raise SpaceError(f"{space.source}: targets: {space.targets!r} matched no nn.{what} outside exclude; such layers: {listed}")
        bad = [f"{n} is {p}" for n in names if isinstance(modules[n], nn.Conv2d) and (p := conv_problem(modules[n]))]
        if bad:
            raise SpaceError(f"{space.source}: targets: {space.targets!r}: {'; '.join(bad[:3])}" + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""))
        return names
    problems, names = [], []
    for i, pat in enumerate(space.targets):
        matched = [n for n in modules if pattern_matches(pat, n) and n not in excluded]
        if not matched:
            problems.append(f"targets[{i}]: {pat!r} matches no module (outside exclude); linear layers: {_preview(linear_names)}")
            continue
        for n in matched:
            problem = _adaptable_problem(modules[n])
            if problem is not None:
                problems.append(f"targets[{i}]: {pat!r} matches {n}, {problem}" if not isinstance(modules[n], GLoraLayer)
                                else f"targets[{i}]: {n} is {problem}")
            elif n not in names:
                names.append(n)
    if problems:
        raise SpaceError(f"{space.source}: " + "; ".join(problems))
    order = {n: i for i, n in enumerate(modules)}
    return sorted(names, key=order.__getitem__)


def glora_layer(base: nn.Module, choices, lora_scaling: LoraScaling | None = None, vector_params: bool = False) -> GLoraLayer:
    """The GLoRA layer for ``base`` (an nn.Linear, an nn.Conv2d, or a GLoRA layer to re-wrap) with
    ``choices``, LoRA's scale ``lora_scaling`` (None: 1) and ``vector_params`` (:attr:`GLoraLayer.vector_params`)."""
    if isinstance(base, (nn.Conv2d, GLoraConv2d)):
        return GLoraConv2d(base, choices, lora_scaling, vector_params)
    return GLoraLinear(base, choices, lora_scaling, vector_params)


def glora_layers(model: nn.Module) -> Iterator[tuple[str, GLoraLayer]]:
    """``(name, layer)`` for every GLoRA layer (linear and convolution), in module order."""
    for name, module in model.named_modules():
        if isinstance(module, GLoraLayer):
            yield name, module


def _layers_or_raise(model: nn.Module) -> dict[str, GLoraLayer]:
    layers = dict(glora_layers(model))
    if not layers:
        raise SpaceError("the model has no GLoRA layers; call apply_glora(model, space) first")
    return layers


def mark_trainable(model: nn.Module, modules_to_save: list[str]) -> None:
    """Freeze everything but the GLoRA tensors and the modules to save (the classifier)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in glora_layers(model):
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    for name in modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.glora_modules_to_save = list(modules_to_save)


def _resolve_modules_to_save(model: nn.Module, modules_to_save: Any) -> list[str]:
    if modules_to_save == "auto":
        return classifier_names(model)
    if modules_to_save is None:
        return []
    names = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    all_names = dict(model.named_modules())
    for n in names:
        if n not in all_names:
            raise SpaceError(f"modules_to_save: {n!r} is not a module of the model")
    return names


def apply_glora(
    model: nn.Module,
    space: SearchSpace | Mapping[str, Any] | str | os.PathLike,
    modules_to_save: Any = "auto",
    lora_scaling: LoraScaling | None = None,
    vector_params: bool = False,
    use_dora: bool = False,
) -> nn.Module:
    """Wrap every targeted ``nn.Linear`` (``nn.Conv2d``) of ``model`` in a :class:`GLoraLinear`
    (:class:`GLoraConv2d`) and freeze the rest.

    ``space`` is a :class:`SearchSpace`, its YAML content as a dict, or a path to the YAML.
    ``modules_to_save`` stay fully trainable: ``"auto"`` is a timm model's classifier
    (``get_classifier()``), which is never adapted; pass names or ``None`` to choose.
    ``lora_scaling`` (:class:`LoraScaling`, PEFT's ``lora_alpha`` and ``use_rslora``) scales every
    low-rank A, B, C by LoRA's ``s``; None scales by 1. ``vector_params`` gives the vector and scalar
    choices of A, B and C their own parameters rather than the down factor's first column (LoRA+
    needs it: docs/lora-family.md). ``use_dora`` turns DoRA on in every layer
    (:meth:`GLoraLayer.set_dora`: a trainable magnitude per output row, starting at W0's row norms,
    so the model still starts at the base model). The model is changed in place and returned.
    """
    space = load_space(space)
    targets = find_targets(model, space)
    keep = _resolve_modules_to_save(model, modules_to_save)
    if not isinstance(use_dora, bool):  # checked before the model is changed
        raise SpaceError(f"use_dora: must be true or false, got {use_dora!r}")
    for name in targets:
        layer = glora_layer(model.get_submodule(name), space.choices, lora_scaling, vector_params)
        if use_dora:
            layer.set_dora(True)
        set_submodule(model, name, layer)
    mark_trainable(model, keep)
    model.glora_space = space
    return model


def set_lora_scaling(model: nn.Module, scaling: LoraScaling | None) -> None:
    """LoRA's scale (:class:`LoraScaling`, None: 1) on every GLoRA layer of ``model``. A sampler
    built before keeps the old scale's plans: build a new :class:`SubnetSampler` after this."""
    for _, layer in _layers_or_raise(model).items():
        layer.set_lora_scaling(scaling)


def set_dora(model: nn.Module, enabled: bool = True) -> None:
    """DoRA on every GLoRA layer of ``model`` (:meth:`GLoraLayer.set_dora`): each new magnitude starts
    at the row norms of its layer's active V, so the model's function is unchanged. Layers that have
    it keep theirs. ``enabled=False`` is refused (SpaceError) if any layer has DoRA, and then nothing
    changes. Build a new :class:`SubnetSampler` after this (its cached plans are kept but DoRA layers
    ignore them, so an old one still works; the count of a configuration changes, though)."""
    layers = _layers_or_raise(model)
    if not isinstance(enabled, bool):
        raise SpaceError(f"use_dora: must be true or false, got {enabled!r}")
    if not enabled:
        dora = [name for name, layer in layers.items() if layer.use_dora]
        if dora:
            raise SpaceError(f"use_dora: {_preview(dora, 3)} use DoRA and their magnitudes m are part of the model's function; "
                             "DoRA cannot be turned off (build the model again from the base model instead)")
        return
    for layer in layers.values():
        layer.set_dora(True)


def dora_layers(model: nn.Module) -> list[str]:
    """The names of the GLoRA layers of ``model`` that use DoRA."""
    return [name for name, layer in glora_layers(model) if layer.use_dora]


def lora_scalings(model: nn.Module) -> set:
    """The distinct LoRA scalings of the GLoRA layers of ``model`` (None: scaled by 1)."""
    return {layer.lora_scaling for _, layer in glora_layers(model)}


def layer_choices(model: nn.Module) -> dict[str, dict[str, tuple]]:
    """Per layer, per tensor, the allowed choices (layers without a bias only allow D = none)."""
    return {name: dict(layer.choices) for name, layer in _layers_or_raise(model).items()}


def choice_costs(model: nn.Module) -> dict[str, dict[str, dict[str, int]]]:
    """Per layer, per tensor, per choice (as a string): the parameters it costs (docs/method.md §2).

    A layer's :attr:`~GLoraLayer.base_cost` (DoRA's magnitude: what it holds whatever its choice) is
    added to every choice of its first tensor, A: the search sums one choice per tensor and layer,
    so its sum is then :func:`count_params`. Without DoRA the base cost is 0 and nothing changes.
    """
    return {
        name: {
            t: {str(c): layer.choice_cost(t, c) + (layer.base_cost if t == TENSORS[0] else 0) for c in layer.choices[t]}
            for t in TENSORS
        }
        for name, layer in _layers_or_raise(model).items()
    }


def get_subnet(model: nn.Module) -> Subnet:
    """The active configuration."""
    return {name: layer.active for name, layer in _layers_or_raise(model).items()}


def _check_subnet(model: nn.Module, config: Any) -> tuple[dict[str, GLoraLayer], Subnet]:
    layers = _layers_or_raise(model)
    source = f"{config}: sub-network" if isinstance(config, (str, os.PathLike)) else "sub-network configuration"
    config = load_subnet(config)
    problems = []
    unknown = [n for n in config if n not in layers]
    if unknown:
        problems.append(f"unknown layer(s) {_preview(unknown, 4)}; GLoRA layers of this model: {_preview(list(layers), 4)}")
    missing = [n for n in layers if n not in config]
    if missing:
        problems.append(f"missing layer(s) {_preview(missing, 4)}: a configuration names every GLoRA layer")
    for name, choice in config.items():
        layer = layers.get(name)
        if layer is None:
            continue
        for t, c in choice.items():
            if c not in layer.choices[t]:
                allowed = ", ".join(str(x) for x in layer.choices[t])
                extra = " (no bias, so D can only be none)" if t == "D" and layer.bias is None else ""
                problems.append(f"{name}.{t}: {str(c)!r} is not allowed; allowed: {allowed}{extra}")
    if problems:
        raise SpaceError(f"{source}: " + "; ".join(problems))
    return layers, config


def set_subnet(model: nn.Module, config: Subnet | Mapping[str, Any] | str | os.PathLike) -> Subnet:
    """Activate ``config`` (a :data:`Subnet`, dict or YAML path) on every GLoRA layer."""
    layers, config = _check_subnet(model, config)
    for name, layer in layers.items():
        layer.active = config[name]
    return config


def sample_subnet(model: nn.Module, generator: torch.Generator, activate: bool = True) -> Subnet:
    """Draw one configuration (uniform per layer and tensor) from ``generator`` and activate it."""
    layers = _layers_or_raise(model)
    config = sample_config({name: layer.choices for name, layer in layers.items()}, generator)
    if activate:
        for name, layer in layers.items():
            layer.active = config[name]
    return config


_N_TENSORS = len(TENSORS)


class SubnetSampler:
    """:func:`sample_subnet` for one model, step after step: the supernet's training loop.

    Draws exactly what :func:`sample_subnet` draws from the same generator, with the host work
    per step cut down, since a step bound by the host pays all of it. The GLoRA layers are found
    once (walking the module tree cost 120 of 290 µs per step on vit_base). Each layer keeps the
    configurations drawn so far, keyed by the drawn indices, together with their plans: a repeated
    draw then builds no :class:`LayerChoice` and hashes none (its dataclass hash runs in Python).
    Build a new sampler if the model's layers are replaced (:func:`extract_subnet`).
    """

    def __init__(self, model: nn.Module):
        self.layers = _layers_or_raise(model)
        self.choices = layer_choices(model)
        # per layer, in sample_config's order: its option lists (A..E) and its cache of draws
        self._draws = [(name, self.layers[name], tuple(per_tensor[t] for t in TENSORS), {}) for name, per_tensor in self.choices.items()]
        counts = [len(options) for _, _, lists, _ in self._draws for options in lists]
        # sample_config spends a uniform only where a tensor has more than one option
        self._drawn = torch.tensor([k for k, n in enumerate(counts) if n > 1], dtype=torch.long)
        self._counts = torch.tensor([n for n in counts if n > 1], dtype=torch.float64)
        self._last = self._counts.long() - 1
        self._slots = len(counts)

    def __call__(self, generator: torch.Generator, activate: bool = True) -> Subnet:
        # The same uniforms in the same order as sample_config (one generator call for all of them),
        # turned into indices the same way, min(int(u * n), n - 1), but in one vectorised pass.
        u = torch.rand(len(self._counts), generator=generator, dtype=torch.float64)
        picked = torch.zeros(self._slots, dtype=torch.long)
        picked[self._drawn] = torch.minimum((u * self._counts).long(), self._last)
        flat = picked.tolist()
        config = {}
        for i, (name, layer, lists, cache) in enumerate(self._draws):
            key = tuple(flat[_N_TENSORS * i : _N_TENSORS * (i + 1)])
            hit = cache.get(key)
            if hit is None:
                choice = LayerChoice(*(options[j] for options, j in zip(lists, key)))
                hit = cache[key] = (choice, layer._plan_of(choice))
            config[name] = hit[0]
            if activate:  # drawn from the layer's own lists: nothing for set_subnet to check
                layer._activate(*hit)
        return config


def uniform_subnet(model: nn.Module, choice: LayerChoice | Mapping[str, str]) -> Subnet:
    """The same choice on every layer; D falls back to none on layers without a bias."""
    choice = LayerChoice.parse(choice, "choice")
    out = {}
    for name, layer in _layers_or_raise(model).items():
        d = choice.D if layer.bias is not None else layer.choices["D"][0]
        out[name] = LayerChoice(choice.A, choice.B, choice.C, d, choice.E)
    return out


@dataclass(frozen=True)
class ParamCount:
    """Adapter parameters of a configuration, and the classifier head's, counted separately."""

    adapter: int
    head: int

    @property
    def total(self) -> int:
        return self.adapter + self.head

    def __int__(self) -> int:
        return self.adapter


def head_params(model: nn.Module) -> int:
    names = getattr(model, "glora_modules_to_save", None)
    if names is None:
        names = _resolve_modules_to_save(model, "auto")
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters())


def count_params(model: nn.Module, config: Subnet | Mapping[str, Any] | str | None = None) -> ParamCount:
    """Parameters a retrained sub-network holds (docs/method.md §2); ``config`` defaults to the active one."""
    if config is None:
        layers, config = _layers_or_raise(model), get_subnet(model)
    else:
        layers, config = _check_subnet(model, config)
    adapter = sum(layer.cost(config[name]) for name, layer in layers.items())
    return ParamCount(adapter=adapter, head=head_params(model))


@torch.no_grad()
def extract_subnet(model: nn.Module, config: Subnet | Mapping[str, Any] | str | None = None) -> nn.Module:
    """Replace every supernet layer by a GLoRA layer holding only ``config``'s tensors at their ranks.

    Each new tensor is the leading slice of the shared one, so the output is unchanged. A DoRA
    layer's small layer has DoRA too, with the same magnitude ``glora_m``. In place.
    """
    if config is None:
        layers, config = _layers_or_raise(model), get_subnet(model)
    else:
        layers, config = _check_subnet(model, config)
    for name, layer in layers.items():
        choice = config[name]
        small = glora_layer(layer, {t: (choice[t],) for t in TENSORS}, layer.lora_scaling)
        if layer.use_dora:
            small.set_dora(True)  # registers glora_m, then copied below with the other tensors
        for pname, p in small.named_parameters(recurse=False):
            if pname.startswith("glora_"):
                t = pname[6]
                # a one-choice layer keeps a vector choice in its down factor, wherever the supernet kept it
                src = layer._down(t, choice[t]) if pname.endswith("d") and t in "ABC" else getattr(layer, pname)
                p.copy_(src[tuple(slice(0, s) for s in p.shape)])
                p.requires_grad_(True)
        for t, kind in layer.lora_init.items():  # PiSSA, LoRA-GA: the offset form (docs/lora-family.md)
            down, up = getattr(small, f"glora_{t}d"), getattr(small, f"glora_{t}u")
            d0 = layer._buffers[f"glora_{t}d0"][tuple(slice(0, s) for s in down.shape)] if down is not None else None
            if up is not None:  # low-rank: the same leading slices of the frozen initial factors
                small.set_lora_offsets(t, kind, d0, layer._buffers[f"glora_{t}u0"][: up.shape[0]])
            elif down is not None and layer._down(t, choice[t]) is layer._parameters[f"glora_{t}d"]:
                # vector or scalar read from the down factor (not their own vector_params): the supernet
                # computes this column less its initial value; the sub-network holds that difference
                # (the same subtraction) and needs no offset
                down.sub_(d0)
        small.active = choice
        set_submodule(model, name, small)
    return model
