"""AdaLoRA: an SVD-shaped low-rank update whose ranks are pruned to a budget during training.

Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen and Zhao, 2023, "AdaLoRA: Adaptive Budget
Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023, arXiv 2303.10512.

Update. Each path is ``ΔW = s · P Λ Q`` with ``P: (out, r)`` (left "singular vectors", PEFT's
``lora_B``), ``Λ = diag(λ)``, ``λ: (r, 1)`` (PEFT's ``lora_E``, zero-initialised) and
``Q: (r, in)`` (right, ``lora_A``). Pruning zeroes entries of λ; P and Q stay. The reference code
(the authors' and PEFT's) uses ``s = α / (r₀ + 10⁻⁵)`` with r₀ the initial rank (``α`` defaults to
r₀ when ``α ≤ 0``), kept fixed while ranks are pruned: :func:`adalora_scale`, :func:`adalora_delta`.

Orthogonality. P and Q are pushed towards orthonormality by

    R(P, Q) = ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F

(the paper writes squared norms; the reference code uses the plain Frobenius norms and averages
over all the matrices of the model, then adds ``orth_reg_weight · R̄`` to the loss:
:func:`orthogonality_penalty`, ``squared=True`` for the paper's form).

Importance. For every entry w of P, λ, Q, after backward: sensitivity ``I = |w · ∂L/∂w|``,
smoothed ``Ī ← β₁ Ī + (1 − β₁) I``, uncertainty ``Ū ← β₂ Ū + (1 − β₂) |I − Ī|`` (with the *new*
Ī), score ``Ī · Ū`` (:func:`update_importance`, :func:`element_score`). Triplet i of a path scores

    S_i = score(λ_i) + mean_j score(Q_ij) + mean_j score(P_ji)

(:func:`triplet_scores`).

Budget. The total rank ``b(t)`` over all paths starts at ``b₀ = Σ r₀`` and falls to
``b_T = target_r · #paths`` on a cubic schedule (:func:`budget_schedule`)::

    b(t) = b₀                                          t ≤ t_i        (warm-up, no masking)
    b(t) = ⌊(b₀ − b_T)(1 − (t − t_i)/(T − t_f − t_i))³ + b_T⌋    otherwise, masking every ΔT steps
    b(t) = b_T                                         t > T − t_f    (final phase, masking every step)

A masking step keeps the ``b(t)`` highest triplet scores across all paths and zeroes the others'
λ (ties at the threshold are dropped, as in the reference code): :func:`budget_masks`.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = [
    "adalora_scale", "adalora_delta", "orthogonality_penalty", "update_importance", "element_score",
    "triplet_scores", "budget_schedule", "budget_masks",
]

RANKNUM_EPS = 1e-5


def adalora_scale(alpha: float, r0: int, eps: float = RANKNUM_EPS) -> float:
    """``α / (r₀ + eps)`` with ``α = r₀`` when ``α ≤ 0``: the reference code's path scale."""
    if not (isinstance(r0, int) and r0 >= 0):
        raise ValueError(f"r0: must be a non-negative integer, got {r0!r}")
    return (alpha if alpha > 0 else float(r0)) / (r0 + eps)


def adalora_delta(P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · P diag(λ) Q``: ``(out, in)`` from ``P: (out, r)``, ``λ: (r,)`` or ``(r, 1)``, ``Q: (r, in)``.
    In activation form the path is ``scale · P ((λ ⊙ Q) x)``."""
    return scale * (P @ (lam.reshape(-1, 1) * Q))


def orthogonality_penalty(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], squared: bool = False) -> torch.Tensor:
    """Mean over all matrices of ``‖PᵀP − I‖_F`` and ``‖QQᵀ − I‖_F`` for the ``(P, Q)`` pairs (a
    differentiable scalar; 0 for no pairs). ``squared=True`` squares each norm (the paper's form)."""
    terms = []
    for P, Q in pairs:
        for gram in (P.mT @ P, Q @ Q.mT):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            n = torch.linalg.matrix_norm(gram - eye)
            terms.append(n * n if squared else n)
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def update_importance(param: torch.Tensor, grad: torch.Tensor, avg_ipt: torch.Tensor | None,
                      avg_unc: torch.Tensor | None, beta1: float = 0.85, beta2: float = 0.85
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the smoothed sensitivity and uncertainty of every entry of ``param``.

    Returns the new ``(avg_ipt, avg_unc)``; pass ``None`` for both on the first step (they start at
    zero). Detached; ``beta1``, ``beta2`` in (0, 1) (the reference defaults are 0.85 each).
    """
    if not (0 < beta1 < 1 and 0 < beta2 < 1):
        raise ValueError(f"beta1, beta2: must be in (0, 1), got {beta1!r}, {beta2!r}")
    with torch.no_grad():
        ipt = (param * grad).abs()
        if avg_ipt is None:
            avg_ipt = torch.zeros_like(ipt)
        if avg_unc is None:
            avg_unc = torch.zeros_like(ipt)
        new_ipt = beta1 * avg_ipt + (1 - beta1) * ipt
        new_unc = beta2 * avg_unc + (1 - beta2) * (ipt - new_ipt).abs()
    return new_ipt, new_unc


def element_score(avg_ipt: torch.Tensor, avg_unc: torch.Tensor) -> torch.Tensor:
    """The importance score of every entry: ``Ī · Ū``."""
    return avg_ipt * avg_unc


def triplet_scores(score_P: torch.Tensor, score_lam: torch.Tensor, score_Q: torch.Tensor) -> torch.Tensor:
    """Score of each of a path's r triplets ``(P[:, i], λ_i, Q[i])`` from the entries' scores: ``(r,)``."""
    return score_lam.reshape(-1) + score_Q.mean(dim=1) + score_P.mean(dim=0)


def budget_schedule(step: int, init_budget: int, target_budget: int, total_step: int,
                    tinit: int = 0, tfinal: int = 0, delta_t: int = 1) -> tuple[int, bool]:
    """``(budget, mask_now)`` at ``step``: the cubic schedule from ``init_budget`` (total initial
    rank) to ``target_budget``, and whether this step masks (see the module docstring)."""
    if tinit >= total_step - tfinal:
        raise ValueError(f"tinit={tinit} must be below total_step - tfinal = {total_step - tfinal}")
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    frac = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * frac ** 3 + target_budget), step % delta_t == 0


def budget_masks(scores: Sequence[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Which triplets stay, one bool mask per path, keeping about ``budget`` of them overall.

    The threshold is the k-th smallest score, ``k = total − budget``; a triplet stays when its score
    is above it (so ties at the threshold go, and fewer than ``budget`` may stay). ``budget`` at or
    above the total keeps everything. Apply with ``lam.masked_fill_(~mask.view_as(lam), 0)``.
    """
    flat = [s.reshape(-1) for s in scores]
    total = sum(f.numel() for f in flat)
    k = total - budget
    if k <= 0:
        return [torch.ones_like(f, dtype=torch.bool) for f in flat]
    threshold = torch.kthvalue(torch.cat(flat), k).values
    return [f > threshold for f in flat]
