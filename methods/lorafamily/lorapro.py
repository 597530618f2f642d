"""LoRA-Pro's gradient adjustment (efficient mode): factor gradients whose equivalent full-weight
gradient is the best one the low-rank path can express.

Wang, Liang, He, Wang and Tan, 2024, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
arXiv 2407.18242 (ICLR 2025); the authors' code is github.com/mrflogs/LoRA-Pro.

Setting. ``W = W0 + s · B A`` with ``B: (m, r)`` (this project's down factor ``Xd``) and
``A: (r, n)`` (the up factor ``Xu``). Autograd gives ``g_A = s Bᵀ G`` and ``g_B = s G Aᵀ`` for the
full gradient ``G = ∂L/∂W``. A step ``(−η g̃_A, −η g̃_B)`` on the factors moves W, to first order,
by ``−η g̃`` with the *equivalent gradient*

    g̃ = s (B g̃_A + g̃_B A)

LoRA-Pro picks ``(g̃_A, g̃_B)`` minimising ``‖g̃ − G‖_F``. Every minimiser is

    g̃_A = s⁻² (BᵀB)⁻¹ g_A + X A
    g̃_B = s⁻² (I − P_B) g_B (AAᵀ)⁻¹ − B X,        P_B = B (BᵀB)⁻¹ Bᵀ

for any ``X: (r, r)`` (``B X A`` cancels in g̃), and they all give

    g̃ = P_B G + (I − P_B) G P_A,                  P_A = Aᵀ (AAᵀ)⁻¹ A

the projection of G onto the tangent space ``{B M + N A}``. Of these, the one closest to the plain
LoRA gradients (minimising ``‖g̃_A − g_A‖² + ‖g̃_B − g_B‖²``) has X solving the Sylvester equation

    BᵀB X + X AAᵀ = −s⁻² (BᵀB)⁻¹ g_A Aᵀ

(the cross terms ``g_A Aᵀ`` and ``Bᵀ g_B`` are both ``s BᵀGAᵀ`` and cancel). At ``B = 0``, where
``BᵀB`` has no inverse, g_A is zero and the adjustment is ``g̃_A = g_A``, ``g̃_B = s⁻² g_B (AAᵀ)⁻¹``
(the authors' first step).

Numerics. The ``r × r`` inverses are damped: ``(M + δI)⁻¹``, as the pseudo-inverse of ``M + δI``
(eigenvalues at or below ``rcond · max`` are dropped, so ``δ = 0`` gives ``M``'s pseudo-inverse).
``BᵀB`` and ``AAᵀ`` are symmetric positive semi-definite, so one ``eigh`` of each gives both the
damped inverse and the Sylvester solution: with ``BᵀB = P diag(p) Pᵀ`` and ``AAᵀ = Q diag(q) Qᵀ``,
``X = P [(Pᵀ C Q)_{ij} / (p_i + q_j)] Qᵀ`` (real, no general eigen-decomposition; the authors
solve the same equation with ``torch.linalg.eig``). The equation itself uses the undamped
``BᵀB`` and ``AAᵀ``; where ``p_i + q_j`` vanishes (both factors rank-deficient along the same
pair of directions, where the right-hand side vanishes too) that component of X is set to 0.

Cost per path, never forming an ``(m, m)`` or ``(m, n)`` matrix: the Gram matrices, the products
with g_A, g_B and the projection ``B ((BᵀB)⁻¹ (Bᵀ M))`` are ``O((m + n) r²)``; the two ``eigh`` and the
``r × r`` products are ``O(r³)``. In all ``O(r³ + (m + n) r²)``, against the ``O(m n r)`` of the
backward pass that produced g_A, g_B. Run it in float32 or float64 (half-precision factors are
upcast and the results cast back).

The "full" mode of the paper (Adam moments on the ``(m, n)`` equivalent gradient) is not here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["LoraProGrads", "lora_pro_grads", "equivalent_gradient", "sylvester_psd"]

DEFAULT_DAMPING = 1e-8


class LoraProGrads(NamedTuple):
    """Adjusted gradients for A and B, and the Sylvester solution X (None on the ``B = 0`` branch)."""

    gA: torch.Tensor
    gB: torch.Tensor
    X: torch.Tensor | None


def _eigh_psd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and vectors of a symmetric PSD matrix, symmetrised first."""
    w, V = torch.linalg.eigh(0.5 * (M + M.mT))
    return w.clamp_min(0), V


def _damped_pinv(w: torch.Tensor, V: torch.Tensor, damping: float, rcond: float) -> torch.Tensor:
    """``pinv(V diag(w) Vᵀ + δI)`` from the eigen-decomposition."""
    d = w + damping
    cutoff = rcond * d.max().clamp_min(torch.finfo(d.dtype).tiny)
    inv = torch.where(d > cutoff, 1.0 / d, torch.zeros_like(d))
    return (V * inv) @ V.mT


def sylvester_psd(wp: torch.Tensor, P: torch.Tensor, wq: torch.Tensor, Q: torch.Tensor, C: torch.Tensor,
                  rcond: float = 0.0) -> torch.Tensor:
    """X with ``M X + X N = C`` for ``M = P diag(wp) Pᵀ``, ``N = Q diag(wq) Qᵀ`` symmetric PSD.

    Components whose denominator ``wp_i + wq_j`` is at or below ``rcond · max`` (a singular
    equation: both M and N singular along them) are set to 0, the minimum-norm solution."""
    den = wp[:, None] + wq[None, :]
    cutoff = rcond * den.max().clamp_min(torch.finfo(den.dtype).tiny)
    inv = torch.where(den > cutoff, 1.0 / den, torch.zeros_like(den))
    return P @ ((P.mT @ C @ Q) * inv) @ Q.mT


def lora_pro_grads(
    A: torch.Tensor,
    B: torch.Tensor,
    gA: torch.Tensor,
    gB: torch.Tensor,
    s: float = 1.0,
    damping: float = DEFAULT_DAMPING,
    *,
    b_is_zero: bool | None = None,
    rcond: float | None = None,
) -> LoraProGrads:
    """LoRA-Pro's adjusted ``(g̃_A, g̃_B)`` for one path ``W0 + s · B A`` (see the module docstring).

    ``A: (r, n)``, ``B: (m, r)`` are the factors, ``gA``, ``gB`` their gradients from backward, ``s``
    the path's scale, ``damping`` the δ of the damped ``r × r`` inverses. ``b_is_zero`` selects the
    ``B = 0`` branch; ``None`` checks ``B`` (a device sync on a GPU: pass it when known, e.g.
    ``step == 0`` for a zero-initialised B). ``rcond`` (default ``r · eps``) is the pseudo-inverse's
    cutoff. Typical use, after ``loss.backward()`` and before ``optimizer.step()``::

        gA, gB, _ = lora_pro_grads(up, down, up.grad, down.grad, s)
        up.grad.copy_(gA); down.grad.copy_(gB)
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A: (r, n) and B: (m, r) expected, got {tuple(A.shape)} and {tuple(B.shape)}")
    if gA.shape != A.shape or gB.shape != B.shape:
        raise ValueError(f"gradient shapes {tuple(gA.shape)}, {tuple(gB.shape)} differ from the factors'")
    if s == 0:
        raise ValueError("s: must be non-zero")
    out_dtype = gA.dtype
    wdt = torch.float64 if A.dtype == torch.float64 else torch.float32
    A, B, gA, gB = (t.detach().to(wdt) for t in (A, B, gA, gB))
    r = A.shape[0]
    rcond = r * torch.finfo(wdt).eps if rcond is None else rcond
    inv_s2 = 1.0 / (s * s)

    wa, Qa = _eigh_psd(A @ A.mT)
    AAt_inv = _damped_pinv(wa, Qa, damping, rcond)
    if b_is_zero is None:
        b_is_zero = not bool(B.any())
    if b_is_zero:
        return LoraProGrads(gA.to(out_dtype), (inv_s2 * (gB @ AAt_inv)).to(out_dtype), None)

    wb, Pb = _eigh_psd(B.mT @ B)
    BtB_inv = _damped_pinv(wb, Pb, damping, rcond)
    gA0 = inv_s2 * (BtB_inv @ gA)                                   # s⁻² (BᵀB)⁻¹ g_A
    gB_AAt = gB @ AAt_inv                                           # g_B (AAᵀ)⁻¹
    gB0 = inv_s2 * (gB_AAt - B @ (BtB_inv @ (B.mT @ gB_AAt)))       # s⁻² (I − P_B) g_B (AAᵀ)⁻¹
    X = sylvester_psd(wb, Pb, wa, Qa, -(gA0 @ A.mT), rcond)
    return LoraProGrads((gA0 + X @ A).to(out_dtype), (gB0 - B @ X).to(out_dtype), X.to(out_dtype))


def equivalent_gradient(A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """``s (B g_A + g_B A)``: the full-weight gradient a factor step with ``(g_A, g_B)`` amounts to
    (dense ``(m, n)``; for tests and diagnostics)."""
    return s * (B @ gA + gB @ A)
