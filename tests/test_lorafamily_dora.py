"""DoRA's weight (methods/lorafamily/dora.py) against PEFT's DoRA Linear (``LoraConfig(use_dora=True)``):
forward and gradients of the factors, the magnitude and the input."""

import pytest
import torch
import torch.nn as nn

from methods.lorafamily import dora_magnitude, dora_row_scale, dora_weight, lora_scale, lowrank_row_norms, row_norms

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_dora_linear(use_rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(9, 7)).double()
    W0, b0 = base[0].weight.detach().clone(), base[0].bias.detach().clone()
    r, alpha = 3, 5
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=r, lora_alpha=alpha, use_dora=True, use_rslora=use_rslora, target_modules=["0"]), base).double()
    layer = theirs[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight
    s = lora_scale(alpha, r, use_rslora)
    # PEFT's magnitude starts at W0's row norms (the norm over the input dim of each output row)
    torch.testing.assert_close(mag.detach(), dora_magnitude(W0), rtol=0, atol=1e-12)
    with torch.no_grad():  # move away from B = 0 and from the initial magnitude
        B.copy_(torch.randn(B.shape, generator=_gen(1), dtype=F64) * 0.3)
        mag.mul_(1 + 0.2 * torch.rand(mag.shape, generator=_gen(2), dtype=F64))

    ours_A, ours_B, ours_m = (t.detach().clone().requires_grad_() for t in (A, B, mag))
    x = torch.randn(6, 9, generator=_gen(3), dtype=F64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_theirs = layer(x1)
    y_ours = nn.functional.linear(x2, dora_weight(W0 + s * ours_B @ ours_A, ours_m), b0)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=1e-12)
    up = torch.randn(y_ours.shape, generator=_gen(4), dtype=F64)
    y_theirs.backward(up)
    y_ours.backward(up)
    for mine, ref in ((ours_A, A), (ours_B, B), (ours_m, mag), (x2, x1)):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=0, atol=1e-12)


def test_norm_is_detached_in_backward():
    V = torch.randn(5, 4, generator=_gen(5), dtype=F64, requires_grad=True)
    m = torch.rand(5, generator=_gen(6), dtype=F64).add(0.5).requires_grad_()
    up = torch.randn(5, 4, generator=_gen(7), dtype=F64)
    dora_weight(V, m).backward(up)
    n = V.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(V.grad, (m.detach()[:, None] / n) * up, rtol=0, atol=1e-14)   # no ∂‖V‖ term
    torch.testing.assert_close(m.grad, (up * V.detach() / n).sum(1), rtol=0, atol=1e-14)
    # the un-detached gradient is different: the test can tell them apart
    V2 = V.detach().clone().requires_grad_()
    (m.detach()[:, None] * V2 / V2.norm(dim=1, keepdim=True)).backward(up)
    assert (V2.grad - V.grad).abs().max() > 1e-3


def test_starts_at_w0_and_rows_have_the_magnitude():
    W0 = torch.randn(6, 8, generator=_gen(8), dtype=F64)
    torch.testing.assert_close(dora_weight(W0, dora_magnitude(W0)), W0, rtol=0, atol=1e-14)
    m = torch.rand(6, generator=_gen(9), dtype=F64)
    V = W0 + 0.1 * torch.randn(6, 8, generator=_gen(10), dtype=F64)
    torch.testing.assert_close(row_norms(dora_weight(V, m)), m, rtol=0, atol=1e-14)
    # the activation form: rescaling V x by m/‖V‖ row-wise is the same layer
    x = torch.randn(3, 8, generator=_gen(11), dtype=F64)
    torch.testing.assert_close(x @ dora_weight(V, m).T, (x @ V.T) * dora_row_scale(row_norms(V), m), rtol=0, atol=1e-13)


def test_conv_weight_norm_is_per_output_channel():
    V = torch.randn(4, 3, 2, 2, generator=_gen(12), dtype=F64)
    m = torch.rand(4, generator=_gen(13), dtype=F64)
    W = dora_weight(V, m)
    torch.testing.assert_close(W.flatten(1).norm(dim=1), m, rtol=0, atol=1e-14)
    with pytest.raises(ValueError):
        dora_weight(V, m[:3])


def test_lowrank_row_norms_match_dense():
    g = _gen(14)
    W0 = torch.randn(11, 7, generator=g, dtype=F64)
    d, u = torch.randn(11, 3, generator=g, dtype=F64), torch.randn(3, 7, generator=g, dtype=F64)
    for s in (1.0, 0.37, -2.0):
        torch.testing.assert_close(lowrank_row_norms(W0, d, u, s), row_norms(W0 + s * d @ u), rtol=0, atol=1e-12)
    torch.testing.assert_close(lowrank_row_norms(W0, d, u, 0.5, w0_sq_norms=(W0 ** 2).sum(1)),
                               row_norms(W0 + 0.5 * d @ u), rtol=0, atol=1e-12)
