"""PiSSA and LoRA-GA initial factors (methods/lorafamily/init.py).

PiSSA against PEFT's ``init_lora_weights="pissa"`` (PEFT replaces W0 by the residual
``W0 − s B⁰A⁰``; the relation tested is that its factors are ours up to the sign of each singular
triplet, its residual is ``W0 − s·down⁰@up⁰``, and its layer equals ours in offset form
``W0 + s(down@up − down⁰@up⁰)`` for any later factors). LoRA-GA against the identity its module
docstring derives for the first SGD step, in float64.
"""

import pytest
import torch
import torch.nn as nn

from methods.lorafamily import frozen_copy, lora_ga_factors, lora_ga_indices, lora_scale, offset_delta, pissa_factors

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _best_rank(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


# -- PiSSA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,r,scale", [((12, 9), 3, 1.0), ((7, 15), 4, 0.5), ((10, 10), 1, 2.0)])
def test_pissa_is_the_best_rank_r_approximation(shape, r, scale):
    W0 = torch.randn(*shape, generator=_gen(), dtype=F64)
    down, up = pissa_factors(W0, r, scale)
    assert down.shape == (shape[0], r) and up.shape == (r, shape[1]) and down.dtype == F64
    S = torch.linalg.svdvals(W0)
    torch.testing.assert_close(scale * down @ up, _best_rank(W0, r), rtol=0, atol=1e-12)
    # Eckart–Young: the residual holds exactly the remaining singular values
    res = W0 - scale * down @ up
    assert torch.linalg.matrix_norm(res) ** 2 == pytest.approx((S[r:] ** 2).sum().item(), rel=1e-12)
    torch.testing.assert_close(torch.linalg.svdvals(res)[: min(shape) - r], S[r:], rtol=0, atol=1e-12)
    # √σ split evenly: both factors carry the same norms, √(σ_i/s)
    torch.testing.assert_close(down.norm(dim=0), (S[:r] / scale).sqrt(), rtol=0, atol=1e-12)
    torch.testing.assert_close(up.norm(dim=1), (S[:r] / scale).sqrt(), rtol=0, atol=1e-12)


def test_pissa_lowrank_variant_is_close():
    g = _gen(1)
    W0 = (torch.randn(20, 3, generator=g, dtype=F64) @ torch.randn(3, 16, generator=g, dtype=F64)
          + 1e-3 * torch.randn(20, 16, generator=g, dtype=F64))  # a clear gap after σ_3
    torch.manual_seed(0)
    down, up = pissa_factors(W0, 3, 1.0, niter=4)
    torch.testing.assert_close(down @ up, _best_rank(W0, 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_matches_peft(use_rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))
    W0 = base[0].weight.detach().clone()
    r, alpha = 3, 6
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["0"], init_lora_weights="pissa")
    theirs = peft.inject_adapter_in_model(cfg, base)
    layer = theirs[0]
    s = lora_scale(alpha, r, use_rslora)
    assert s == layer.scaling["default"]
    down, up = pissa_factors(W0, r, s)
    B, A = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
    sign = torch.sign((down * B).sum(0))  # singular vectors are defined up to a sign per triplet
    assert (sign.abs() == 1).all()
    torch.testing.assert_close(down * sign, B, rtol=0, atol=1e-5)
    torch.testing.assert_close(up * sign[:, None], A, rtol=0, atol=1e-5)
    # PEFT's base weight is the residual: W0 − s·down⁰ up⁰
    torch.testing.assert_close(layer.base_layer.weight.detach(), W0 - s * down @ up, rtol=0, atol=1e-5)
    # Offset form = PEFT's residual form for any factors: start from theirs, move both the same way
    with torch.no_grad():
        d0, u0 = frozen_copy(B, A)
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.add_(0.1 * torch.randn(p.shape, generator=_gen(3)))
        d, u = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        x = torch.randn(5, 10, generator=_gen(4))
        ours = nn.functional.linear(x, W0 + offset_delta(d, u, d0, u0, s), layer.base_layer.bias)
        torch.testing.assert_close(ours, layer(x), rtol=0, atol=1e-5)


def test_offset_form_starts_exactly_at_w0():
    W0 = torch.randn(9, 7, generator=_gen(5))
    down, up = pissa_factors(W0, 3, 0.7)
    d0, u0 = frozen_copy(down, up)
    assert d0.data_ptr() != down.data_ptr() and not d0.requires_grad
    delta = offset_delta(down, up, d0, u0, 0.7)
    assert torch.equal(W0 + delta, W0)  # bit for bit, not approximately
    assert torch.equal(offset_delta(down[:, :2], up[:2], d0[:, :2], u0[:2], 0.7), torch.zeros(9, 7))


# -- LoRA-GA ----------------------------------------------------------------------------------

def _first_step(W0, G_fn, down0, up0, s, lr):
    """One SGD step on the factors of W = W0 + s(D U − D⁰ U⁰), by autograd; returns the weight change."""
    d0, u0 = frozen_copy(down0, up0)
    d, u = down0.clone().requires_grad_(), up0.clone().requires_grad_()
    W = W0 + offset_delta(d, u, d0, u0, s)
    G_fn(W).backward()
    opt = torch.optim.SGD([d, u], lr=lr)
    opt.step()
    with torch.no_grad():
        return offset_delta(d, u, d0, u0, s)


def _loss_and_grad(W0, seed=7):
    """A quadratic loss of W and its gradient G at W0 (float64)."""
    g = _gen(seed)
    X = torch.randn(W0.shape[1], 30, generator=g, dtype=F64)
    Y = torch.randn(W0.shape[0], 30, generator=g, dtype=F64)

    def loss(W):
        return 0.5 * ((W @ X - Y) ** 2).sum() / X.shape[1]

    W = W0.clone().requires_grad_()
    loss(W).backward()
    return loss, W.grad


def _predicted_step(G, idx_d, idx_u, s, c, lr):
    """−η s² c² Σ_{I_D ∪ I_U} σ u vᵀ + η² s³ c² U_U diag(σ_U σ_D) V_Dᵀ (module docstring)."""
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    # the factors' sign convention: the largest-magnitude entry of every u_i positive, v_i flipped with it
    signs = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
    U, Vh = U * signs, Vh * signs.mT
    idx = sorted(set(idx_d) | set(idx_u))
    first = (U[:, idx] * S[idx]) @ Vh[idx]
    second = (U[:, idx_u] * (S[idx_u] * S[idx_d])) @ Vh[idx_d]
    return -lr * s * s * c * c * first + lr * lr * s ** 3 * c * c * second


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
@pytest.mark.parametrize("stable", [True, False])
def test_lora_ga_first_step_identity(direction, stable):
    torch.manual_seed(0)
    W0 = torch.randn(14, 11, generator=_gen(6), dtype=F64)
    loss, G = _loss_and_grad(W0)
    r, s, lr = 3, lora_scale(8, 3, rslora=True), 0.05
    down, up = lora_ga_factors(G, r, s, stable=stable, direction=direction, niter=None)
    assert down.shape == (14, r) and up.shape == (r, 11) and down.dtype == F64
    c = 14 ** 0.25 / 16 ** 0.5 if stable else 1 / s
    # factors: orthonormal singular vectors times c
    torch.testing.assert_close(down.T @ down, c * c * torch.eye(r, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(up @ up.T, c * c * torch.eye(r, dtype=F64), rtol=0, atol=1e-12)
    idx_d, idx_u = lora_ga_indices(r, direction)
    step = _first_step(W0, loss, down, up, s, lr)
    torch.testing.assert_close(step, _predicted_step(G, idx_d, idx_u, s, c, lr), rtol=0, atol=1e-12)
    # to first order: a full fine-tuning step on the best rank-2r approximation of G, times s²c²
    small = 1e-8  # the second-order term is then ~small·s³c²σ², far below the tolerance
    step = _first_step(W0, loss, down, up, s, small)
    torch.testing.assert_close(step / small, -(s * c) ** 2 * _best_rank(G, 2 * r), rtol=0, atol=1e-5 * G.abs().max().item())
    if not stable:  # the "gd" scale: exactly a full fine-tuning step on G_2r, to first order
        torch.testing.assert_close(step / small, -_best_rank(G, 2 * r), rtol=0, atol=1e-5)


def test_lora_ga_default_uses_svd_lowrank_and_is_exact_on_low_rank_gradients():
    # G of rank 8 <= q = min(4r, ...) = 8: the randomized SVD is then exact
    g = _gen(8)
    G = torch.randn(16, 8, generator=g, dtype=F64) @ torch.diag(torch.tensor([9., 7, 5, 4, 3, 2, 1.5, 1], dtype=F64)) \
        @ torch.linalg.qr(torch.randn(12, 8, generator=g, dtype=F64))[0].T
    torch.manual_seed(0)
    down, up = lora_ga_factors(G, 2, 1.0)  # authors' defaults: stable, gamma 16, ArB2r, niter 4
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    c = 16 ** 0.25 / 4
    # ArB2r: down from u_3, u_4, up from v_1, v_2 (each up to sign)
    torch.testing.assert_close((down.T @ U[:, 2:4]).abs(), c * torch.eye(2, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close((up @ Vh[:2].T).abs(), c * torch.eye(2, dtype=F64), rtol=0, atol=1e-10)


def test_lora_ga_nested_slices():
    G = torch.randn(13, 10, generator=_gen(9), dtype=F64)
    R, k = 4, 2
    d, u = lora_ga_factors(G, R, niter=None, direction="ArBr")
    dk, uk = lora_ga_factors(G, k, niter=None, direction="ArBr")
    torch.testing.assert_close(d[:, :k], dk, rtol=0, atol=0)   # interleaved: a slice is the rank-k init
    torch.testing.assert_close(u[:k], uk, rtol=0, atol=0)
    d, u = lora_ga_factors(G, R, niter=None)                    # ArB2r: slices keep SVD order per factor
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    c = 13 ** 0.25 / 4
    torch.testing.assert_close(d[:, :k].abs(), c * U[:, R:R + k].abs(), rtol=0, atol=1e-12)
    torch.testing.assert_close(u[:k].abs(), c * Vh[:k].abs(), rtol=0, atol=1e-12)


def test_lora_ga_for_glora_a_uses_the_hadamard_gradient():
    """A multiplies W0 element-wise: with G_A = W0 ⊙ G, the A path's first step is W0 ⊙ (the identity for G_A)."""
    W0 = torch.randn(12, 9, generator=_gen(10), dtype=F64)
    loss, G = _loss_and_grad(W0, seed=11)
    GA = W0 * G
    s, lr, r = 1.0, 0.02, 2
    down, up = lora_ga_factors(GA, r, s, niter=None)
    d0, u0 = frozen_copy(down, up)
    d, u = down.clone().requires_grad_(), up.clone().requires_grad_()
    loss(W0 + W0 * offset_delta(d, u, d0, u0, s)).backward()
    torch.testing.assert_close(u.grad, s * d0.T @ GA, rtol=0, atol=1e-12)  # ∂L/∂U = s D⁰ᵀ (W0 ⊙ G)
    torch.optim.SGD([d, u], lr=lr).step()
    with torch.no_grad():
        step = W0 * offset_delta(d, u, d0, u0, s)
    c = 12 ** 0.25 / 4
    idx_d, idx_u = lora_ga_indices(r)
    torch.testing.assert_close(step, W0 * _predicted_step(GA, idx_d, idx_u, s, c, lr), rtol=0, atol=1e-12)


def test_factor_shapes_and_errors():
    G = torch.randn(6, 5, generator=_gen(12))
    d, u = lora_ga_factors(G, 2)
    assert d.dtype == torch.float32 and d.shape == (6, 2) and u.shape == (2, 5)
    with pytest.raises(ValueError):
        lora_ga_factors(G, 3)  # needs 6 singular vectors, has 5
    with pytest.raises(ValueError):
        lora_ga_factors(G, 1, direction="AB")
    with pytest.raises(ValueError):
        pissa_factors(G, 2, scale=0.0)
    with pytest.raises(ValueError):
        pissa_factors(G, 6)
    d, u = pissa_factors(G.to(torch.bfloat16), 2)
    assert d.dtype == torch.bfloat16
