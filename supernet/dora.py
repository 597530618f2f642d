"""DoRA: the adapted weight split into a learned magnitude per output row and a direction.

Liu, Wang, Yin, Molchanov, Wang, Cheng and Chen, 2024, "DoRA: Weight-Decomposed Low-Rank
Adaptation", arXiv 2402.09353.

With ``V = W0 + ΔW`` (``ΔW`` any adapter's update, ``s · B A`` for LoRA, GLoRA's
``W0 ⊙ A + B`` here) the layer uses

    W' = m ⊙ V / ‖V‖,        ‖V‖_i = ‖V[i, :]‖₂   (one norm per output row)
    y  = W' x + b0

with a trainable magnitude ``m: (out,)`` initialised to the row norms of W0 (:func:`dora_magnitude`),
so the model starts at W0 when ``ΔW = 0``. The norm is taken over the input dimension for each
output row, PEFT's convention (``torch.linalg.norm(W, dim=1)``; the paper's "column-wise" norm is
over W's columns in its ``(in, out)`` layout); for a convolution weight ``(out, in/g, kh, kw)`` it
is over everything but the output channel. Section 4.3 of the paper treats ``‖V‖`` as a constant
in backward (detached): it is recomputed from the current V in every forward pass but passes no
gradient, which saves memory; then

    ∂L/∂m = (∂L/∂W' ⊙ V / ‖V‖) summed per row,    ∂L/∂V = (m / ‖V‖) ⊙ ∂L/∂W'

The bias is not rescaled. :func:`dora_weight` builds ``W'``; :func:`dora_row_scale` gives the
per-row factor ``m / ‖V‖`` for a layer that applies V to the activations and rescales its output
(``y = (m/‖V‖) ⊙ (V x) + b0``), and :func:`lowrank_row_norms` computes ``‖W0 + s B A‖`` row-wise
without the dense ``(out, in)`` update.

GLoRA's layers use these (``GLoraLayer.set_dora``, docs/lora-family.md "DoRA"), so they live in
``supernet/`` (which imports nothing from ``methods/``); ``methods.lorafamily.dora`` re-exports them.
"""

from __future__ import annotations

import torch

__all__ = ["dora_magnitude", "row_norms", "dora_row_scale", "dora_weight", "lowrank_row_norms"]


def row_norms(V: torch.Tensor) -> torch.Tensor:
    """``‖V[i]‖₂`` over every dimension but the first: ``(out,)``."""
    return torch.linalg.vector_norm(V.reshape(V.shape[0], -1), dim=1)


def dora_magnitude(W0: torch.Tensor) -> torch.Tensor:
    """The magnitude's initial value, W0's row norms (detached), for ``nn.Parameter(dora_magnitude(W0))``."""
    return row_norms(W0.detach()).clone()


def dora_row_scale(norms: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``m / ‖V‖`` with the norms detached: the per-output-row factor of DoRA, ``(out,)``.

    A row with ``‖V‖ = 0`` (pretrained checkpoints have them: EfficientNet-Lite0's dead depthwise
    channels, Llama-3.1's ``o_proj`` rows, PEFT issue 2049) is divided by 1 instead of 0. Its direction
    is undefined and its output is zero whatever the factor, so this changes nothing but the 0/0
    that would make the whole model NaN; every other row is exact."""
    n = norms.detach()
    return magnitude / torch.where(n > 0, n, torch.ones_like(n))


def dora_weight(V: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's weight ``m ⊙ V / ‖V‖`` (row norms detached in backward); V is ``(out, …)``, m ``(out,)``."""
    if magnitude.shape != V.shape[:1]:
        raise ValueError(f"magnitude: expected shape ({V.shape[0]},), got {tuple(magnitude.shape)}")
    scale = dora_row_scale(row_norms(V.detach()), magnitude)
    return V * scale.view(-1, *([1] * (V.ndim - 1)))


def lowrank_row_norms(W0: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0,
                      w0_sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Row norms of ``W0 + scale · down @ up`` without forming it (detached: DoRA needs no gradient).

    ``‖w_i + s d_iᵀ U‖² = ‖w_i‖² + 2 s d_i · (W0 Uᵀ)_i + s² d_iᵀ (U Uᵀ) d_i``: one ``(out, r)`` product
    with W0 and an ``r × r`` Gram matrix. ``w0_sq_norms`` (``‖w_i‖²``, constant for a frozen W0) may be
    passed to skip recomputing it. Cancellation can make the sum slightly negative when the
    update nearly annihilates a row; it is clamped at 0.
    """
    with torch.no_grad():
        W = W0.reshape(W0.shape[0], -1)
        sq = (W * W).sum(1) if w0_sq_norms is None else w0_sq_norms
        WUt = W @ up.mT
        cross = (down * WUt).sum(1)
        quad = ((down @ (up @ up.mT)) * down).sum(1)
        return (sq + 2 * scale * cross + scale * scale * quad).clamp_min(0).sqrt()
