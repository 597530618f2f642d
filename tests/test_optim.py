"""engine.optim.adamw: the fused kernel where PyTorch has one, the same update as the default AdamW."""

import torch

from engine.optim import adamw


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(7, 3), (5,), (1,)]]


def _train(opt, params, steps: int = 5):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def test_cpu_parameters_get_the_fused_kernel_and_the_default_update():
    ours, ref = _params(), _params()
    opt = adamw(ours, lr=1e-2, weight_decay=1e-2)
    assert opt.defaults["fused"] is True
    start = [p.detach().clone() for p in ours]
    got = _train(opt, ours)
    want = _train(torch.optim.AdamW(ref, lr=1e-2, weight_decay=1e-2, foreach=False), ref)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(got, start))  # the weights moved
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_weight_decay_is_applied():
    a, b = _params(), _params()
    got_a = _train(adamw(a, lr=1e-1, weight_decay=0.0), a)
    got_b = _train(adamw(b, lr=1e-1, weight_decay=0.5), b)
    assert not torch.allclose(got_a[0], got_b[0])
