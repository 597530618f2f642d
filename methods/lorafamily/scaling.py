"""Scale and learning rates of a low-rank path ``ΔW = s · B A`` (B: ``(out, r)``, A: ``(r, in)``).

rsLoRA (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
arXiv 2312.03732). LoRA (Hu et al., 2021, arXiv 2106.09685) scales its update by ``s = α / r``,
so the update's size shrinks as the rank grows and large ranks learn no better than small ones.
rsLoRA scales by

    s = α / √r

which keeps the activations' and gradients' magnitudes rank-independent (the paper's rank
stabilisation argument). :func:`lora_scale` gives either.

LoRA+ (Hayou, Ghosh and Yu, 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv 2402.12354). With A and B on the same learning rate, feature learning is inefficient at
large width; the paper's fix is to let B (the factor on the output side, the zero-initialised
one) learn ``λ`` times faster:

    η_B = λ · η_A,   λ = 2⁴ = 16 by default

:func:`loraplus_param_groups` splits ``(name, param)`` pairs into optimizer parameter groups: the
slow group at ``lr``, the fast group at ``λ · lr``, and a no-decay variant of each. Because the
ratio lives in the groups' ``lr``, any scheduler that scales each group's base lr (cosine,
warm-up, ``LambdaLR``) keeps it.

In this project's naming (docs/method.md §2) a GLoRA low-rank tensor is ``Xd @ Xu`` with the
*down* factor ``Xd: (rows, R)`` zero-initialised, so ``Xd`` is LoRA's B and ``Xu`` LoRA's A;
:func:`glora_zero_init_factor` names those parameters.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

__all__ = ["lora_scale", "loraplus_param_groups", "glora_zero_init_factor", "DEFAULT_LORAPLUS_RATIO"]

DEFAULT_LORAPLUS_RATIO = 16.0

Predicate = Callable[[str, torch.Tensor], bool]


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """The scale ``s`` of ``ΔW = s · B A``: ``α / r`` (LoRA) or ``α / √r`` (rsLoRA)."""
    if not (isinstance(r, int) and r > 0):
        raise ValueError(f"r: must be a positive integer, got {r!r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


def glora_zero_init_factor(name: str, param: torch.Tensor | None = None) -> bool:
    """Whether ``name`` is a GLoRA down factor (``glora_Ad``, ``glora_Bd``, ``glora_Cd``): the
    zero-initialised factor, LoRA's B, the one LoRA+ speeds up. ``param`` is ignored (the
    signature is :func:`loraplus_param_groups`' predicate's)."""
    return name.rsplit(".", 1)[-1] in ("glora_Ad", "glora_Bd", "glora_Cd")


def loraplus_param_groups(
    named_params: Iterable[tuple[str, torch.Tensor]],
    is_fast: Predicate,
    *,
    lr: float,
    ratio: float = DEFAULT_LORAPLUS_RATIO,
    weight_decay: float = 0.0,
    no_decay: Predicate | None = None,
) -> list[dict]:
    """Optimizer parameter groups for LoRA+.

    ``is_fast(name, param)`` marks the B factors (lr ``ratio · lr``); every other parameter gets
    ``lr``. ``no_decay(name, param)`` marks parameters that take no weight decay (biases, norms);
    the rest take ``weight_decay``. Parameters with ``requires_grad=False`` are left out, and so
    are empty groups. The result goes straight to an optimizer: ``torch.optim.AdamW(groups)``.

    Groups, in order (each present only if non-empty): slow, slow without decay, fast, fast without
    decay; each dict has ``params``, ``lr`` and ``weight_decay``, plus ``names`` (the parameters'
    names, for logging; optimizers keep extra keys as they are).
    """
    if ratio <= 0:
        raise ValueError(f"ratio: must be positive, got {ratio!r}")
    buckets: dict[tuple[bool, bool], tuple[list, list]] = {k: ([], []) for k in
                                                           ((False, False), (False, True), (True, False), (True, True))}
    seen: set[int] = set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:  # a tied parameter is listed once, as optimizers require
            continue
        seen.add(id(p))
        key = (bool(is_fast(name, p)), bool(no_decay(name, p)) if no_decay is not None else False)
        buckets[key][0].append(p)
        buckets[key][1].append(name)
    groups = []
    for (fast, nd), (params, names) in buckets.items():
        if params:
            groups.append({"params": params, "names": names, "lr": lr * ratio if fast else lr,
                           "weight_decay": 0.0 if nd else weight_decay})
    return groups
