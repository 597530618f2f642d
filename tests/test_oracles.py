"""Oracles we did not write: PEFT's GLoRA and LoRA layers, given the same weights, agree with ours."""

import copy

import pytest
import torch

import models
from conftest import LARGE_SPACE
from supernet import apply_glora, glora_layers, set_subnet, uniform_subnet

peft = pytest.importorskip("peft")
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TARGETS = ["qkv", "attn.proj", "fc1", "fc2"]


def _ours_and_base():
    torch.manual_seed(0)
    base = models.vit().eval()
    ours = apply_glora(copy.deepcopy(base), {"targets": TARGETS, "choices": {
        "A": ["lora8", "vector", "scalar"], "B": ["lora8", "vector", "scalar"], "C": ["lora8", "vector"],
        "D": ["vector", "scalar"], "E": ["vector", "scalar"]}})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "glora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return base, ours


@pytest.mark.parametrize(
    "ab,c,de",
    [("lora", "lora", "constant"), ("vector", "vector", "vector"), ("constant", "vector", "constant"), ("lora", "vector", "vector")],
)
def test_matches_peft_glora(ab, c, de):
    base, ours = _ours_and_base()
    name = {"lora": "lora8", "constant": "scalar"}
    choice = dict(A=name.get(ab, ab), B=name.get(ab, ab), C=name.get(c, c), D=name.get(de, de), E=name.get(de, de))
    set_subnet(ours, uniform_subnet(ours, choice))
    cfg = peft.GloraConfig(r=8, target_modules=TARGETS, config_A_B=ab, config_C=c, config_D_E=de)
    theirs = peft.inject_adapter_in_model(cfg, copy.deepcopy(base)).eval()
    with torch.no_grad():
        for lname, layer in glora_layers(ours):
            peft_layer = theirs.get_submodule(lname)
            for t in "AB":
                path = getattr(peft_layer, f"glora_{t}")["default"]
                d, u = getattr(layer, f"glora_{t}d"), getattr(layer, f"glora_{t}u")
                if ab == "lora":
                    path.Xd.copy_(d), path.Xu.copy_(u)
                elif ab == "vector":
                    path.X.copy_(d[:, 0:1])
                else:
                    path.X.copy_(d[0, 0:1])
            path = peft_layer.glora_C["default"]
            if c == "lora":
                path.Xd.copy_(layer.glora_Cd), path.Xu.copy_(layer.glora_Cu)
            else:
                path.X.copy_(layer.glora_Cd[:, 0:1])
            for t in "DE":
                path = getattr(peft_layer, f"glora_{t}")["default"]
                p = getattr(layer, f"glora_{t}")
                path.X.copy_(p if de == "vector" else p[0:1])
    want = theirs(X)
    got = ours(X)
    assert (got - base(X)).abs().max() > 1e-3
    assert (got - want).abs().max().item() <= 1e-5


def test_b_lora_only_matches_peft_lora():
    base, ours = _ours_and_base()
    # the space of _ours_and_base has no 'none'; with A, C, D, E zeroed only the low-rank B remains
    set_subnet(ours, uniform_subnet(ours, dict(A="vector", B="lora8", C="vector", D="scalar", E="scalar")))
    with torch.no_grad():
        for _, layer in glora_layers(ours):
            for p in (layer.glora_Ad, layer.glora_Cd, layer.glora_D, layer.glora_E):
                p.zero_()
    cfg = peft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    theirs = peft.inject_adapter_in_model(cfg, copy.deepcopy(base)).eval()
    with torch.no_grad():
        for lname, layer in glora_layers(ours):
            pl = theirs.get_submodule(lname)
            assert pl.scaling["default"] == 1.0
            pl.lora_A["default"].weight.copy_(layer.glora_Bu)
            pl.lora_B["default"].weight.copy_(layer.glora_Bd)
    got, want = ours(X), theirs(X)
    assert (got - base(X)).abs().max() > 1e-3
    assert (got - want).abs().max().item() <= 1e-5
