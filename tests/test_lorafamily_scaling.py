"""rsLoRA's scale and LoRA+'s parameter groups (methods/lorafamily/scaling.py) against PEFT."""

import math

import pytest
import torch
import torch.nn as nn

from methods.lorafamily import glora_zero_init_factor, lora_scale, loraplus_param_groups

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.fc2(self.norm(self.fc1(x))))


@pytest.mark.parametrize("r", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("alpha", [1, 8, 32])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_scale_matches_peft(r, alpha, rslora):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["fc1"])
    model = peft.inject_adapter_in_model(cfg, Tiny())
    assert lora_scale(alpha, r, rslora) == pytest.approx(model.fc1.scaling["default"], rel=1e-15)
    assert lora_scale(alpha, r, rslora) == pytest.approx(alpha / (math.sqrt(r) if rslora else r))


def test_lora_scale_rejects_bad_rank():
    with pytest.raises(ValueError):
        lora_scale(8, 0)


def _no_decay(name, p):
    """transformers' usual rule: biases and LayerNorm parameters take no weight decay."""
    return "bias" in name or ".norm." in name or name.endswith("norm.weight")


@pytest.mark.parametrize("ratio", [16.0, 4.0])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_loraplus_groups_match_peft(ratio, wd):
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head", "norm"])
    model = peft.get_peft_model(Tiny(), cfg)
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio,
                                       loraplus_weight_decay=wd)
    # PEFT's rule for the fast group: lora_B, and every 1-D parameter (biases, norms)
    groups = loraplus_param_groups(model.named_parameters(), lambda n, p: "lora_B" in n or p.ndim == 1,
                                   lr=1e-3, ratio=ratio, weight_decay=wd, no_decay=_no_decay)
    ours = torch.optim.AdamW(groups)

    def per_param(opt):
        return {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 8  # lora A/B of two layers, the saved head and norm (weight, bias)
    assert per_param(ours) == per_param(theirs)
    assert set(per_param(ours)) == {id(p) for p in trainable}
    lrs = {n: g["lr"] for g in groups for n in g["names"]}
    assert {n for n, lr in lrs.items() if lr == 1e-3 * ratio} >= {n for n in lrs if "lora_B" in n}
    assert all(lrs[n] == 1e-3 for n in lrs if "lora_A" in n)


def test_loraplus_groups_skip_frozen_tied_and_empty():
    a, b, frozen = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2), requires_grad=False)
    groups = loraplus_param_groups([("x.lora_A", a), ("x.lora_B", b), ("x.lora_B_tied", b), ("f", frozen)],
                                   lambda n, p: "lora_B" in n, lr=0.1)
    assert [(g["names"], g["lr"], g["weight_decay"]) for g in groups] == [(["x.lora_A"], 0.1, 0.0), (["x.lora_B"], 1.6, 0.0)]
    torch.optim.SGD(groups)  # a valid optimizer input


def test_glora_predicate_names_the_zero_initialised_factors():
    from supernet import GLoraLinear, load_space
    from conftest import LARGE_SPACE

    torch.manual_seed(0)
    layer = GLoraLinear(nn.Linear(6, 5), load_space(LARGE_SPACE).choices)
    named = dict(layer.named_parameters())
    fast = {n for n, p in named.items() if glora_zero_init_factor(n, p)}
    assert fast == {"glora_Ad", "glora_Bd", "glora_Cd"}
    assert all(not named[n].any() for n in fast)                 # LoRA's B: zero at the start
    assert all(named[n[:-1] + "u"].abs().sum() > 0 for n in fast)  # their up partners are not
    assert glora_zero_init_factor("blocks.0.attn.qkv.glora_Bd") and not glora_zero_init_factor("blocks.0.attn.qkv.glora_Bu")
