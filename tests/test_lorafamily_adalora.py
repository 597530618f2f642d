"""AdaLoRA's pieces (methods/lorafamily/adalora.py) against PEFT: the SVDLinear forward, the
orthogonality penalty AdaLoraModel adds to the loss, RankAllocator's importance EMAs, triplet
scores and masks, and its cubic budget schedule."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from methods.lorafamily import (adalora_delta, adalora_scale, budget_masks, budget_schedule, element_score,
                                orthogonality_penalty, triplet_scores, update_importance)

peft = pytest.importorskip("peft")
F64 = torch.float64
TARGETS = ["fc1", "fc2", "fc3"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 7), nn.Linear(7, 4)

    def forward(self, x, y=None):
        out = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return SimpleNamespace(logits=out, loss=None if y is None else ((out - y) ** 2).mean())


def _model(**kw):
    torch.manual_seed(0)
    args = dict(init_r=6, target_r=2, lora_alpha=4, target_modules=TARGETS, total_step=100, tinit=10, tfinal=20,
                deltaT=5, beta1=0.85, beta2=0.85, orth_reg_weight=0.5)
    args.update(kw)
    model = peft.get_peft_model(Tiny().double(), peft.AdaLoraConfig(**args)).double()
    with torch.no_grad():  # AdaLoRA starts with λ = 0; give every triplet a value
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.copy_(torch.randn(p.shape, dtype=p.dtype))
    return model


def _layers(model):
    return [model.base_model.model.get_submodule(t) for t in TARGETS]


def _factors(layer):
    return layer.lora_B["default"], layer.lora_E["default"], layer.lora_A["default"]  # P, λ, Q


@pytest.mark.parametrize("alpha", [4, 0])
def test_svd_linear_forward(alpha):
    model = _model(lora_alpha=alpha)
    layer = _layers(model)[1]
    P, lam, Q = _factors(layer)
    x = torch.randn(5, 8, dtype=F64)
    W = layer.base_layer.weight + adalora_delta(P, lam, Q, adalora_scale(alpha, 6))
    torch.testing.assert_close(nn.functional.linear(x, W, layer.base_layer.bias), layer(x), rtol=0, atol=1e-12)
    assert adalora_scale(alpha, 6) == pytest.approx(layer.scaling["default"] / (layer.ranknum["default"].item() + 1e-5), rel=1e-15)


def test_orthogonality_penalty_matches_adalora_loss():
    model = _model()
    x, y = torch.randn(5, 6, dtype=F64), torch.randn(5, 4, dtype=F64)
    with torch.no_grad():
        plain = model.base_model.model(x, y).loss
    total = model.base_model(x, y).loss                            # AdaLoraModel.forward adds 0.5 · R̄
    pairs = [(P, Q) for P, _, Q in map(_factors, _layers(model))]
    torch.testing.assert_close(total - plain, 0.5 * orthogonality_penalty(pairs), rtol=0, atol=1e-12)
    # differentiable, and zero on orthonormal factors
    pen = orthogonality_penalty(pairs)
    pen.backward()
    assert pairs[0][0].grad is not None and pairs[0][0].grad.abs().sum() > 0
    q = torch.linalg.qr(torch.randn(8, 3, dtype=F64))[0]
    assert orthogonality_penalty([(q, q.T)]).item() == pytest.approx(0, abs=1e-14)
    P, Q = torch.randn(5, 2, dtype=F64), torch.randn(2, 4, dtype=F64)
    sq = orthogonality_penalty([(P, Q)], squared=True)
    expected = (((P.T @ P - torch.eye(2, dtype=F64)) ** 2).sum() + ((Q @ Q.T - torch.eye(2, dtype=F64)) ** 2).sum()) / 2
    torch.testing.assert_close(sq, expected, rtol=1e-14, atol=0)


def test_importance_scores_and_masks_match_rank_allocator():
    model = _model()
    alloc = model.base_model.rankallocator
    names = [n for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    params = dict(model.named_parameters())
    ema = {n: (None, None) for n in names}
    for step in range(4):
        x, y = torch.randn(5, 6, dtype=F64), torch.randn(5, 4, dtype=F64)
        model.zero_grad()
        model.base_model.model(x, y).loss.backward()
        alloc.update_ipt(model)
        for n in names:
            ema[n] = update_importance(params[n], params[n].grad, *ema[n], beta1=0.85, beta2=0.85)
    for n in names:
        torch.testing.assert_close(ema[n][0], alloc.exp_avg_ipt[n], rtol=0, atol=1e-15)
        torch.testing.assert_close(ema[n][1], alloc.exp_avg_unc[n], rtol=0, atol=1e-15)
        assert ema[n][1].abs().sum() > 0
    # triplet scores and the budget's masks
    scores = []
    for t in TARGETS:
        pre = [n for n in names if f".{t}.lora_E" in n][0]
        sc = {k: element_score(*ema[pre.replace("lora_E", k)]) for k in ("lora_B", "lora_E", "lora_A")}
        scores.append(triplet_scores(sc["lora_B"], sc["lora_E"], sc["lora_A"]))
    assert alloc.init_bgt == 18
    for budget in (14, 9, 6):
        masks = budget_masks(scores, budget)
        pattern = alloc.mask_to_budget(model, budget)
        theirs = [pattern[[k for k in pattern if f".{t}.lora_E" in k][0]] for t in TARGETS]
        assert [m.tolist() for m in masks] == theirs
        assert sum(int(m.sum()) for m in masks) == budget  # scores are distinct: exactly the budget stays
    assert all(m.all() for m in budget_masks(scores, 18)) and all(m.all() for m in budget_masks(scores, 40))


@pytest.mark.parametrize("tinit,tfinal,delta_t", [(10, 20, 5), (0, 0, 1), (3, 50, 7)])
def test_budget_schedule_matches_rank_allocator(tinit, tfinal, delta_t):
    model = _model(tinit=tinit, tfinal=tfinal, deltaT=delta_t)
    alloc = model.base_model.rankallocator
    seen = set()
    for step in range(0, 106):
        ours = budget_schedule(step, 18, 6, 100, tinit, tfinal, delta_t)
        assert ours == alloc.budget_schedule(step)
        seen.add(ours[0])
    assert {18, 6} <= seen and len(seen) > 5  # the cubic part is exercised


def test_budget_schedule_shape():
    b = [budget_schedule(t, 120, 40, 1000, 100, 200)[0] for t in range(0, 1001)]
    assert b[:101] == [120] * 101 and b[801:] == [40] * 200
    assert all(x >= y for x, y in zip(b, b[1:]))                # non-increasing
    mid = 100 + (800 - 100) // 2                                # half-way: 1/8 of the gap left
    assert b[mid] == int(80 * 0.5 ** 3 + 40)
    with pytest.raises(ValueError):
        budget_schedule(5, 10, 2, 100, tinit=90, tfinal=10)
