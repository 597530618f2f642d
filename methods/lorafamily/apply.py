"""PiSSA and LoRA-GA on a model's GLoRA layers, in offset form (docs/lora-family.md).

The math is :mod:`.init` (:func:`~.init.pissa_factors`, :func:`~.init.lora_ga_factors`); this module
picks, for every GLoRA layer, which tensors take which init and from which matrix, and hands the
factors to :meth:`supernet.GLoraLayer.set_lora_init`, which keeps frozen copies so that every
sub-network starts exactly at W0: ``s (Xd Xu − Xd⁰ Xu⁰)``.

- :func:`init_pissa`: B's factors from W0's top singular triplets (A multiplies W0 element-wise, its
  base is not W0; C is a bias term: both keep LoRA's init).
- :func:`estimate_weight_grads`: ``G = ∂L/∂W0`` of every GLoRA layer, with the adapters switched off.
- :func:`init_lora_ga`: B's factors from G's, A's from ``W0 ⊙ G`` (``∂L/∂A``); C keeps LoRA's init.

A tensor is initialised at its largest rank R (the shared factors' size); a ``lora_k`` choice of a
supernet is the leading rank-k slice, with its own offset. A layer whose matrix has fewer singular
vectors than that needs (R for PiSSA, 2R for LoRA-GA; a depthwise 3x3 convolution has 9) keeps LoRA's
init there, and the report counts it; a model where no layer fits is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from supernet import TENSORS, Choice, GLoraLayer, LayerChoice, glora_layers

from .init import DIRECTIONS, lora_ga_factors, pissa_factors, too_few_singular_vectors

__all__ = ["InitReport", "init_pissa", "estimate_weight_grads", "init_lora_ga", "lora_ga_direction"]

_NAMES = {"pissa": "PiSSA", "lora_ga": "LoRA-GA"}
_ALL_NONE = LayerChoice(*(Choice("none") for _ in TENSORS))


@dataclass(frozen=True)
class InitReport:
    """What a data-aware init did: per layer, the tensors it initialised (in A, B, C order)."""

    kind: str  # "pissa" or "lora_ga"
    layers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    untouched: tuple[str, ...] = ()  # the tensors this init never applies to (they keep LoRA's init)
    # per layer, the tensors whose matrix has fewer singular vectors than the init needs at their rank
    # (a depthwise 3x3 convolution's (C, 9) kernel at rank 8, say): they keep LoRA's init
    too_small: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @staticmethod
    def _counts(layers: Mapping[str, tuple[str, ...]]) -> str:
        counts = {t: sum(t in ts for ts in layers.values()) for t in "ABC"}
        return ", ".join(f"{t} on {n} layer{'s' * (n != 1)}" for t, n in counts.items() if n)

    def __str__(self) -> str:
        done = self._counts(self.layers) or "nothing (no low-rank choice)"
        verb = "keeps" if len(self.untouched) == 1 else "keep"
        keep = f"; {' and '.join(self.untouched)} {verb} LoRA's init" if self.untouched else ""
        small = (f"; LoRA's init where too few singular vectors for the rank: {self._counts(self.too_small)}"
                 if self.too_small else "")
        return f"{_NAMES[self.kind]} init (offset form): {done}{keep}{small}"


def _none_fit(kind: str, first: str | None) -> None:
    """A model where *no* layer can take the init is a mistake worth stopping for (a model with
    only some small layers is not: those keep LoRA's init, and the report says how many)."""
    if first is not None:
        raise ValueError(f"{first}; no GLoRA layer of this model has enough for {_NAMES[kind]} at its rank")


# The tensors each init starts (the others keep LoRA's own init): PiSSA needs W0 as the tensor's
# base, which only B has; LoRA-GA needs the tensor's full gradient, which A and B have.
INIT_TENSORS = {"pissa": ("B",), "lora_ga": ("A", "B")}


def prepare_offsets(model: nn.Module, kind: str) -> None:
    """Frozen initial factors on every tensor ``kind`` would start, holding the current factors until
    :func:`init_pissa` / :func:`init_lora_ga` or a checkpoint sets them: a resumed run then computes
    in offset form without redoing the initialisation."""
    for _, layer in glora_layers(model):
        for t in INIT_TENSORS[kind]:
            if _largest_lora(layer, t) is not None:
                layer.set_lora_offsets(t, kind, getattr(layer, f"glora_{t}d").detach(), getattr(layer, f"glora_{t}u").detach())


def _largest_lora(layer: GLoraLayer, tensor: str) -> Choice | None:
    """The largest low-rank choice of ``tensor`` on ``layer`` (the shared factors' rank), or None."""
    lora = [c for c in layer.choices[tensor] if c.kind == "lora"]
    return max(lora, key=lambda c: c.rank) if lora else None


def _weight_matrix(layer: GLoraLayer) -> torch.Tensor:
    """W0 as the ``(rows, cols)`` matrix A and B act on (a convolution's ``(out, in/groups·kh·kw)``)."""
    return layer.weight.detach().reshape(layer.rows, layer.cols)


def _low_rank_among(model: nn.Module, tensors: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``tensors`` with a low-rank choice on some layer: the ones an init leaves at LoRA's own."""
    return tuple(t for t in tensors if any(_largest_lora(layer, t) is not None for _, layer in glora_layers(model)))


def _scale(layer: GLoraLayer, choice: Choice) -> float:
    s = layer.lora_factor(choice)
    return 1.0 if s is None else s


def init_pissa(model: nn.Module, *, niter: int | None = None) -> InitReport:
    """PiSSA (Meng et al. 2024) on every GLoRA layer with a low-rank B choice.

    B's factors become W0's top-R singular triplets, ``√(σ/s)`` on each side, R the layer's largest
    B rank and ``s`` LoRA's scale of rank R: ``s · Bd⁰ Bu⁰`` is W0's best rank-R approximation. A
    ``lora_k`` slice of a supernet is then ``(s_k / s_R)`` times the best rank-k approximation. The
    factors are kept as frozen copies (offset form), so the model is unchanged until it trains.
    ``niter`` as :func:`~.init.pissa_factors` (None: an exact SVD, float32 at least).
    """
    done, small, first = {}, {}, None
    for name, layer in glora_layers(model):
        top = _largest_lora(layer, "B")
        if top is None:
            continue
        why = too_few_singular_vectors("PiSSA", top.rank, (layer.rows, layer.cols))
        if why:
            small[name] = ("B",)
            first = first or f"{name}: PiSSA on B: {why}"
            continue
        try:
            down, up = pissa_factors(_weight_matrix(layer), top.rank, _scale(layer, top), niter=niter)
        except ValueError as err:
            raise ValueError(f"{name}: PiSSA on B: {err}") from None
        layer.set_lora_init("B", "pissa", down, up)
        done[name] = ("B",)
    if not done:
        _none_fit("pissa", first)
    return InitReport("pissa", done, _low_rank_among(model, tuple(t for t in "ABC" if t not in INIT_TENSORS["pissa"])), small)


@torch.no_grad()
def _restore(saved):
    for module, training in saved["modes"]:
        module.training = training
    for p, flag in saved["flags"]:
        p.requires_grad_(flag)
    for layer, (choice, plan) in saved["active"].items():
        layer._activate(choice, plan)
    for layer, grad in saved["grads"].items():
        layer.weight.grad = grad


def estimate_weight_grads(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """LoRA-GA's ``G = ∂L/∂W0`` for every GLoRA layer, ``(rows, cols)`` in float32, averaged over ``batches``.

    ``loss_fn(model, batch)`` returns the scalar loss of one batch (the caller unpacks the batch and
    moves it to the device). The gradient is the frozen base model's: every GLoRA layer runs with
    all its tensors ``none`` (whatever its choices allow; the adapters add exactly nothing then), in
    eval mode (no dropout or drop-path noise, batch-norm statistics untouched), with autocast off
    (the authors estimate in float32). Only the GLoRA layers' weights require a gradient meanwhile.
    ``reduce`` is applied to each averaged tensor (in place, or returning the result): pass an
    all-reduce that averages over the processes of a distributed run, and pass the unwrapped model
    (not a DistributedDataParallel wrapper, whose reducer expects the adapters' gradients, not the
    weights'). Afterwards the model's
    ``requires_grad`` flags, active choices, modes and weight gradients are as they were.
    """
    layers = dict(glora_layers(model))
    if not layers:
        raise ValueError("estimate_weight_grads: the model has no GLoRA layers")
    saved = {
        "modes": [(m, m.training) for m in model.modules()],
        "flags": [(p, p.requires_grad) for p in model.parameters()],
        "active": {layer: (layer.active, layer._plan) for layer in layers.values()},
        "grads": {layer: layer.weight.grad for layer in layers.values()},
    }
    sums = {name: torch.zeros(layer.rows, layer.cols, dtype=torch.float32, device=layer.weight.device)
            for name, layer in layers.items()}
    n = 0
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            layer.active = _ALL_NONE  # set directly: all-none need not be among the layer's choices
            layer.weight.grad = None
            layer.weight.requires_grad_(True)
        device_type = next(iter(layers.values())).weight.device.type
        for batch in batches:
            with torch.enable_grad(), torch.autocast(device_type, enabled=False):
                loss = loss_fn(model, batch)
                loss.backward()
            for name, layer in layers.items():
                if layer.weight.grad is not None:  # a layer the loss does not reach has G = 0
                    sums[name].add_(layer.weight.grad.reshape(layer.rows, layer.cols).float())
                    layer.weight.grad = None
            n += 1
    finally:
        _restore(saved)
    if n == 0:
        raise ValueError("estimate_weight_grads: no batches (LoRA-GA's authors use 8 to 64)")
    out = {}
    for name, g in sums.items():
        g.div_(n)
        if reduce is not None:
            r = reduce(g)
            g = g if r is None else r
        out[name] = g
    return out


def lora_ga_direction(layer: GLoraLayer, tensor: str, direction: str | None = None) -> str:
    """The direction :func:`init_lora_ga` uses for ``tensor`` of ``layer``: ``direction`` if given;
    else the authors' ``"ArB2r"`` for a tensor with one lora rank, and ``"ArBr"`` for one with several
    (a supernet), whose leading rank-k slices are exactly the rank-k LoRA-GA init."""
    if direction is not None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
        return direction
    ranks = {c.rank for c in layer.choices[tensor] if c.kind == "lora"}
    return "ArB2r" if len(ranks) <= 1 else "ArBr"


def init_lora_ga(
    model: nn.Module,
    grads: Mapping[str, torch.Tensor],
    scale: str = "stable",
    gamma: float = 16.0,
    direction: str | None = None,
    *,
    niter: int | None = 4,
) -> InitReport:
    """LoRA-GA (Wang et al. 2024) on every GLoRA layer's low-rank B and A, from ``grads``
    (:func:`estimate_weight_grads`).

    B's factors come from ``G`` and A's from ``W0 ⊙ G`` (A multiplies W0 element-wise, so that is
    ``∂L/∂A``); C keeps LoRA's init. Each tensor is initialised at its largest rank R with
    :func:`~.init.lora_ga_factors`: ``scale="stable"`` (the authors' default, ``c = rows^{1/4}/√gamma``)
    or ``"gd"`` (``c = 1/s``, s LoRA's scale of rank R), ``direction`` per :func:`lora_ga_direction`,
    ``niter`` as ``torch.svd_lowrank``'s (None: an exact SVD). ``torch.svd_lowrank`` draws from the
    global RNG: seed it identically on every process of a distributed run.
    """
    if scale not in ("stable", "gd"):
        raise ValueError(f"scale: expected 'stable' or 'gd', got {scale!r}")
    if direction is not None:
        lora_ga_direction(None, "B", direction)  # checks the name
    done, small, first = {}, {}, None
    for name, layer in glora_layers(model):
        tensors = [t for t in INIT_TENSORS["lora_ga"] if _largest_lora(layer, t) is not None]
        if not tensors:
            continue
        G = grads.get(name)
        if G is None:
            raise ValueError(f"{name}: no estimated gradient for this GLoRA layer (grads from estimate_weight_grads(model, ...))")
        if tuple(G.shape) != (layer.rows, layer.cols):
            raise ValueError(f"{name}: gradient has shape {tuple(G.shape)}, expected {(layer.rows, layer.cols)}")
        G = G.detach().to(device=layer.weight.device, dtype=torch.float32 if layer.weight.dtype != torch.float64 else torch.float64)
        started = []
        for t in tensors:
            top = _largest_lora(layer, t)
            why = too_few_singular_vectors("LoRA-GA", top.rank, (layer.rows, layer.cols))
            if why:
                small[name] = (*small.get(name, ()), t)
                first = first or f"{name}: LoRA-GA on {t}: {why}"
                continue
            target = G if t == "B" else _weight_matrix(layer).to(G.dtype) * G
            try:
                down, up = lora_ga_factors(target, top.rank, _scale(layer, top), gamma, scale == "stable",
                                           direction=lora_ga_direction(layer, t, direction), niter=niter)
            except ValueError as err:
                raise ValueError(f"{name}: LoRA-GA on {t}: {err}") from None
            layer.set_lora_init(t, "lora_ga", down, up)
            started.append(t)
        if started:
            done[name] = tuple(started)
    if not done:
        _none_fit("lora_ga", first)
    return InitReport("lora_ga", done, _low_rank_among(model, tuple(t for t in "ABC" if t not in INIT_TENSORS["lora_ga"])), small)
