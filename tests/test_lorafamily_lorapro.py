"""LoRA-Pro's adjusted gradients (methods/lorafamily/lorapro.py), in float64.

Checked against the identities of the module docstring (the equivalent gradient is
``P_B G + (I − P_B) G P_A``; X solves its Sylvester equation) and against an independent oracle:
the least-squares problem ``min ‖s(B g̃_A + g̃_B A) − G‖`` solved on its vectorised matrix, taking
among its minimisers the one closest to the plain LoRA gradients.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from methods.lorafamily import equivalent_gradient, lora_pro_grads

F64 = torch.float64


def _setup(m, n, r, s, seed=0, rank_b=None, rank_a=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=F64)
    B = torch.randn(m, r, generator=g, dtype=F64)
    if rank_b is not None:  # a rank-deficient B
        B = B[:, :rank_b] @ torch.randn(rank_b, r, generator=g, dtype=F64)
    if rank_a is not None:
        A = torch.randn(r, rank_a, generator=g, dtype=F64) @ A[:rank_a]
    G = torch.randn(m, n, generator=g, dtype=F64)
    return A, B, G, s * B.T @ G, s * G @ A.T  # chain rule for W = W0 + s B A


def _proj(M):
    """Orthogonal projection onto M's column space."""
    return M @ torch.linalg.pinv(M)


@pytest.mark.parametrize("m,n,r,s", [(9, 7, 2, 1.0), (12, 8, 3, 2.5), (6, 10, 4, 0.3)])
def test_equivalent_gradient_is_the_projection_and_x_solves_sylvester(m, n, r, s):
    A, B, G, gA, gB = _setup(m, n, r, s)
    out = lora_pro_grads(A, B, gA, gB, s, damping=0.0)
    PB, PA = _proj(B), _proj(A.T)
    expected = PB @ G + (torch.eye(m, dtype=F64) - PB) @ G @ PA
    torch.testing.assert_close(equivalent_gradient(A, B, out.gA, out.gB, s), expected, rtol=0, atol=1e-10)
    X = out.X
    rhs = -(1 / s ** 2) * torch.linalg.inv(B.T @ B) @ gA @ A.T
    torch.testing.assert_close(B.T @ B @ X + X @ A @ A.T, rhs, rtol=0, atol=1e-10)
    # the closed form of g̃_A, g̃_B around X
    torch.testing.assert_close(out.gA, torch.linalg.inv(B.T @ B) @ gA / s ** 2 + X @ A, rtol=0, atol=1e-10)
    gB0 = (torch.eye(m, dtype=F64) - PB) @ gB @ torch.linalg.inv(A @ A.T) / s ** 2
    torch.testing.assert_close(out.gB, gB0 - B @ X, rtol=0, atol=1e-10)


@pytest.mark.parametrize("m,n,r,s", [(7, 6, 2, 1.0), (8, 5, 3, 1.7)])
def test_matches_least_squares_oracle(m, n, r, s):
    A, B, G, gA, gB = _setup(m, n, r, s, seed=1)
    # the linear map (g̃_A, g̃_B) -> s(B g̃_A + g̃_B A) as a matrix on vec(g̃_A) ++ vec(g̃_B)
    cols = []
    for k in range(r * n + m * r):
        e = torch.zeros(r * n + m * r, dtype=F64)
        e[k] = 1
        cols.append(equivalent_gradient(A, B, e[: r * n].view(r, n), e[r * n:].view(m, r), s).reshape(-1))
    L = torch.stack(cols, 1)
    x0 = torch.linalg.lstsq(L, G.reshape(-1, 1)).solution.view(-1)
    U, S, Vh = torch.linalg.svd(L)
    N = Vh[(S > 1e-10 * S[0]).sum():].T                  # the null space: the (XA, −BX) gauge, r² dims
    assert N.shape[1] == r * r
    g = torch.cat([gA.reshape(-1), gB.reshape(-1)])
    best = x0 + N @ (N.T @ (g - x0))                       # the minimiser closest to the LoRA gradients
    out = lora_pro_grads(A, B, gA, gB, s, damping=0.0)
    torch.testing.assert_close(torch.cat([out.gA.reshape(-1), out.gB.reshape(-1)]), best, rtol=0, atol=1e-10)


def test_b_zero_branch():
    A, B, G, gA, gB = _setup(9, 7, 3, 2.0, seed=2)
    B = torch.zeros_like(B)
    gA = 2.0 * B.T @ G
    out = lora_pro_grads(A, B, gA, gB, 2.0, damping=0.0)  # detected
    assert out.X is None
    torch.testing.assert_close(out.gA, gA, rtol=0, atol=0)
    torch.testing.assert_close(out.gB, gB @ torch.linalg.inv(A @ A.T) / 4.0, rtol=0, atol=1e-12)
    # at B = 0 the best the path can do is G's projection onto A's row space
    torch.testing.assert_close(equivalent_gradient(A, B, out.gA, out.gB, 2.0), G @ _proj(A.T), rtol=0, atol=1e-10)
    forced = lora_pro_grads(A, B, gA, gB, 2.0, damping=0.0, b_is_zero=True)
    torch.testing.assert_close(forced.gB, out.gB, rtol=0, atol=0)


def test_damping_and_rank_deficient_factors():
    A, B, G, gA, gB = _setup(10, 8, 3, 1.0, seed=3)
    exact = lora_pro_grads(A, B, gA, gB, 1.0, damping=0.0)
    damped = lora_pro_grads(A, B, gA, gB, 1.0)  # default δ = 1e-8
    torch.testing.assert_close(damped.gA, exact.gA, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(damped.gB, exact.gB, rtol=1e-6, atol=1e-8)
    # B of rank 1 < r: the pseudo-inverse keeps the projection identity
    A, B, G, gA, gB = _setup(10, 8, 3, 1.0, seed=4, rank_b=1)
    out = lora_pro_grads(A, B, gA, gB, 1.0, damping=0.0)
    assert all(torch.isfinite(t).all() for t in out)
    PB, PA = _proj(B), _proj(A.T)
    expected = PB @ G + (torch.eye(10, dtype=F64) - PB) @ G @ PA
    torch.testing.assert_close(equivalent_gradient(A, B, out.gA, out.gB), expected, rtol=0, atol=1e-9)
    out = lora_pro_grads(A, B, gA, gB, 1.0)
    assert all(torch.isfinite(t).all() for t in out)
    # both rank-deficient: the Sylvester equation is singular along the common null directions
    A, B, G, gA, gB = _setup(10, 8, 3, 1.0, seed=5, rank_b=2, rank_a=1)
    out = lora_pro_grads(A, B, gA, gB, 1.0, damping=0.0)
    assert all(torch.isfinite(t).all() for t in out) and out.X.abs().max() < 1e3
    PB, PA = _proj(B), _proj(A.T)
    expected = PB @ G + (torch.eye(10, dtype=F64) - PB) @ G @ PA
    torch.testing.assert_close(equivalent_gradient(A, B, out.gA, out.gB), expected, rtol=0, atol=1e-9)
    rhs = -torch.linalg.pinv(B.T @ B) @ gA @ A.T
    torch.testing.assert_close(B.T @ B @ out.X + out.X @ A @ A.T, rhs, rtol=0, atol=1e-9)
    # ... and X is its minimum-norm solution (nothing along the singular directions)
    eye = torch.eye(3, dtype=F64)
    K = torch.kron((B.T @ B).contiguous(), eye) + torch.kron(eye, (A @ A.T).mT.contiguous())  # row-major vec(M X + X N)
    x_min = torch.linalg.pinv(K, rtol=1e-10) @ rhs.reshape(-1)
    torch.testing.assert_close(out.X.reshape(-1), x_min, rtol=0, atol=1e-9)


def test_dtypes_and_shapes():
    A, B, G, gA, gB = (t.float() for t in _setup(9, 7, 2, 1.0, seed=5))
    out = lora_pro_grads(A, B, gA, gB)
    assert out.gA.dtype == torch.float32 and out.gA.shape == A.shape and out.gB.shape == B.shape
    ref = lora_pro_grads(*(t.double() for t in (A, B, gA, gB)))
    torch.testing.assert_close(out.gB.double(), ref.gB, rtol=1e-4, atol=1e-5)
    half = lora_pro_grads(*(t.bfloat16() for t in (A, B, gA, gB)))
    assert half.gA.dtype == torch.bfloat16 and torch.isfinite(half.gB.float()).all()
    with pytest.raises(ValueError):
        lora_pro_grads(A, B.T, gA, gB)
    with pytest.raises(ValueError):
        lora_pro_grads(A, B, gA.T, gB)


class _Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_builds_a_dense_matrix():
    """O(r³ + (m + n) r²): no intermediate is larger than a factor."""
    m, n, r = 300, 200, 4
    A, B, G, gA, gB = _setup(m, n, r, 1.0, seed=6)
    with _Sizes() as sizes:
        lora_pro_grads(A, B, gA, gB)
    assert sizes.largest <= max(m, n) * r
