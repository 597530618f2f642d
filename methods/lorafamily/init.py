"""Data-aware initialisations of a low-rank path: PiSSA and LoRA-GA, both in offset form.

Notation. A low-rank path is ``ΔW = s · D U`` with the down factor ``D: (out, r)`` and the up
factor ``U: (r, in)`` (this project's ``Xd``, ``Xu``: LoRA's B and A). The functions here return
``(down, up)``.

**Offset form.** Both methods start the factors away from zero, so ``s · D⁰ U⁰ ≠ 0``. Instead of
subtracting that from the frozen weight (as PiSSA's and LoRA-GA's code do, which rewrites W0 and
makes the merge depend on how W0 is stored), the layer keeps frozen copies ``D⁰, U⁰`` of the
initial factors and adds

    ΔW = s · (D U − D⁰ U⁰)                                    (:func:`offset_delta`)

The model starts exactly at W0 (both products are the same computation on the same tensors, so
they cancel bit for bit), W0 is never touched, and a merge is ``W0 + ΔW``. The frozen copies cost
``r · (out + in)`` values, not a dense ``(out, in)`` matrix, and a leading slice ``D[:, :k], U[:k]``
of a weight-entangled rank-R path has its own offset ``D⁰[:, :k] U⁰[:k]``. In activation form the
path is ``s · (D (U x) − D⁰ (U⁰ x))``. The trajectories match the reference methods': with PEFT's
residual ``W_res = W0 − s D⁰ U⁰`` the weight ``W_res + s D U`` equals ``W0 + s (D U − D⁰ U⁰)`` for
every ``D, U``, and the factors receive the same gradients.

**PiSSA** (Meng, Wang and Zhang, 2024, "PiSSA: Principal Singular Values and Singular Vectors
Adaptation of Large Language Models", arXiv 2404.02948). With ``W0 = Σ σ_i u_i v_iᵀ``,

    D⁰ = [u_1 … u_r] · diag(√(σ_i / s)),   U⁰ = diag(√(σ_i / s)) · [v_1 … v_r]ᵀ

so ``s · D⁰ U⁰ = W0_r``, the best rank-r approximation of W0 (Eckart–Young:
``‖W0 − W0_r‖_F² = Σ_{i>r} σ_i²``), and the path trains W0's principal subspace.

**LoRA-GA** (Wang, Yu and Li, 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
arXiv 2407.05000; the authors' code is github.com/Outsider565/LoRA-GA). Let ``G = ∂L/∂W`` at W0,
averaged over a few batches, and ``G ≈ Σ σ_i u_i v_iᵀ`` from ``torch.svd_lowrank(G, q=min(4r,
min(out, in)), niter=4)``. The factors take disjoint sets of singular vectors, ``I_D`` for the down
factor and ``I_U`` for the up factor; the authors' default direction ``"ArB2r"`` is
``I_U = {1..r}``, ``I_D = {r+1..2r}``:

    D⁰ = c · [u_i]_{i ∈ I_D},   U⁰ = c · [v_i]ᵀ_{i ∈ I_U}

with the "stable" scale ``c = out^{1/4} / √γ``, ``γ = 16`` (the output size only), or the "gd" scale
``c = 1 / s``. The other directions are ``"A2rBr"`` (``I_D = {1..r}``, ``I_U = {r+1..2r}``) and
``"ArBr"`` (interleaved: ``I_D = {1, 3, …, 2r−1}``, ``I_U = {2, 4, …, 2r}``).

*First step.* At W0 the factor gradients are ``g_U = s D⁰ᵀ G`` and ``g_D = s G U⁰ᵀ``. One SGD step of
size η on both factors moves the weight by

    s (D¹ U¹ − D⁰ U⁰) = −η s² (D⁰ D⁰ᵀ G + G U⁰ᵀ U⁰) + η² s · g_D g_U
                      = −η s² c² (Σ_{i ∈ I_D ∪ I_U} σ_i u_i v_iᵀ) + η² s³ c² · U_U diag(σ_U ⊙ σ_D) V_Dᵀ

(the second line with G's exact SVD, ``U_U = [u_i]_{I_U}``, ``V_D = [v_i]_{I_D}``, σ paired in
order). For the directions above ``I_D ∪ I_U = {1..2r}``, so the first-order step is
``−η s² c² G_{2r}``: a full fine-tuning step on the best rank-2r approximation of G, scaled by
``s² c²`` (exactly ``−η G_{2r}`` with the "gd" scale). The tests check this identity in float64.

*Nested ranks* (weight entanglement). A rank-k slice keeps the first k singular vectors of each
factor's index set, in SVD order. For ``"ArBr"`` that is exactly the rank-k LoRA-GA init (from the
same SVD, and with the "stable" scale, which does not depend on r); for
``"ArB2r"`` the slice's index sets are ``{1..k}`` and ``{r+1..r+k}``, still disjoint but not the
best rank-2k pair.

*GLoRA's A.* A multiplies W0 element-wise: ``W = W0 + W0 ⊙ A + …``, so ``∂L/∂A = W0 ⊙ G``, and
:func:`lora_ga_factors` takes that as its gradient for A's factors; the first-step identity holds
with ``G`` replaced by ``W0 ⊙ G``, and the weight moves by ``W0 ⊙`` it.

``torch.svd_lowrank`` draws its random test matrix from the global RNG: seed it identically on every
process of a distributed run (or pass ``niter=None`` for an exact SVD on small layers).
"""

from __future__ import annotations

import math

import torch

__all__ = ["pissa_factors", "lora_ga_factors", "too_few_singular_vectors", "lora_ga_indices", "offset_delta", "frozen_copy", "DIRECTIONS"]

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """SVDs run in float32 at least (no half-precision SVD), float64 stays float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# singular vectors each init takes per unit of rank: PiSSA W0's top r, LoRA-GA the gradient's top 2r
VECTORS_PER_RANK = {"PiSSA": 1, "LoRA-GA": 2}


def too_few_singular_vectors(name: str, r: int, shape) -> str | None:
    """Why a ``shape`` matrix cannot take init ``name`` ("PiSSA", "LoRA-GA") at rank ``r``, or None."""
    needed = VECTORS_PER_RANK[name] * r
    if needed > min(shape):
        return f"r={r}: {name} needs {needed} singular vectors, a {tuple(shape)} matrix has {min(shape)}"
    return None


def _check_rank(name: str, r: int, shape) -> None:
    if not (isinstance(r, int) and r > 0):
        raise ValueError(f"r: must be a positive integer, got {r!r}")
    why = too_few_singular_vectors(name, r, shape)
    if why:
        raise ValueError(why)


def pissa_factors(W0: torch.Tensor, r: int, scale: float = 1.0, *, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's initial ``(down, up)`` for a frozen ``W0: (out, in)``: ``scale · down @ up`` is W0's
    best rank-``r`` approximation, ``√σ`` split evenly between the factors.

    ``niter=None`` takes an exact SVD; an integer takes ``torch.svd_lowrank(W0, q=r, niter=niter)``
    (PiSSA's fast variant, PEFT's ``pissa_niter_<n>``). The factors come back in W0's dtype;
    ``scale`` must be positive.
    """
    if W0.ndim != 2:
        raise ValueError(f"W0: expected a matrix, got shape {tuple(W0.shape)}")
    _check_rank("PiSSA", r, W0.shape)
    if not scale > 0:
        raise ValueError(f"scale: must be positive, got {scale!r}")
    W = W0.detach().to(_work_dtype(W0))
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.mT
    root = (S / scale).sqrt()
    return (U * root).to(W0.dtype).contiguous(), (root[:, None] * Vh).to(W0.dtype).contiguous()


def lora_ga_indices(r: int, direction: str = "ArB2r") -> tuple[list[int], list[int]]:
    """The singular-vector indices (0-based, SVD order) ``(I_D, I_U)`` of the down and up factors."""
    if direction == "ArB2r":
        return list(range(r, 2 * r)), list(range(r))
    if direction == "A2rBr":
        return list(range(r)), list(range(r, 2 * r))
    if direction == "ArBr":
        return list(range(0, 2 * r, 2)), list(range(1, 2 * r, 2))
    raise ValueError(f"direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")


def lora_ga_factors(
    G: torch.Tensor,
    r: int,
    scale: float = 1.0,
    gamma: float = 16.0,
    stable: bool = True,
    *,
    direction: str = "ArB2r",
    niter: int | None = 4,
    q: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's initial ``(down, up)`` from the estimated gradient ``G = ∂L/∂W: (out, in)``.

    ``stable=True``: both factors are scaled by ``out^{1/4} / √gamma`` (the authors' default);
    ``stable=False``: by ``1 / scale`` (their "gd" scale, whose first step is ``−η G_{2r}``).
    ``scale`` is the path's ``s``, used only by the "gd" scale (the offset ``s · down @ up`` is the
    caller's, see :func:`offset_delta`). ``niter``/``q`` are ``torch.svd_lowrank``'s, ``q`` by
    default ``min(4r, out, in)`` as in the authors' code; ``niter=None`` takes an exact SVD.
    The factors come back in G's dtype.
    """
    if G.ndim != 2:
        raise ValueError(f"G: expected a matrix, got shape {tuple(G.shape)}")
    _check_rank("LoRA-GA", r, G.shape)
    idx_d, idx_u = lora_ga_indices(r, direction)
    g = G.detach().to(_work_dtype(G))
    if niter is None:
        U, S, Vh = torch.linalg.svd(g, full_matrices=False)
        V = Vh.mT
    else:
        q = min(4 * r, *g.shape) if q is None else q
        if q < 2 * r:
            raise ValueError(f"q={q}: LoRA-GA needs at least 2r = {2 * r} singular vectors")
        U, S, V = torch.svd_lowrank(g, q=q, niter=niter)
    # Each singular pair's sign is the SVD routine's choice, and rounding (another process count's
    # order of summing G) can flip it; flipping u_i and v_i together leaves the SVD valid, so fix it:
    # the largest-magnitude entry of every u_i is positive (as scikit-learn's svd_flip). LoRA-GA puts
    # u_i and v_j of different pairs into the two factors, so an unfixed sign would change the init.
    signs = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
    signs[signs == 0] = 1
    U, V = U * signs, V * signs
    if stable:
        c = g.shape[0] ** 0.25 / math.sqrt(gamma)
    else:
        if scale == 0:
            raise ValueError("scale: the 'gd' scale 1/s needs s != 0")
        c = 1.0 / scale
    down = U[:, idx_d] * c
    up = V[:, idx_u].mT * c
    return down.to(G.dtype).contiguous(), up.to(G.dtype).contiguous()


def frozen_copy(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen ``(D⁰, U⁰)`` to keep next to freshly initialised factors (detached clones)."""
    return down.detach().clone(), up.detach().clone()


def offset_delta(down: torch.Tensor, up: torch.Tensor, down0: torch.Tensor, up0: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale · (down @ up − down0 @ up0)``: the offset-form update, exactly zero while the factors
    equal their frozen copies. For a leading rank-k slice pass the sliced factors and copies."""
    return scale * (down @ up - down0 @ up0)
