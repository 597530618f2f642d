"""RepAdapter: the count against the closed formula on ViT-B, the forward against the paper's
equation computed by hand in float64, the merge exact in float64 and loading strictly into plain
timm, and the settings/models it refuses."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import methods
from conftest import LARGE_SPACE, tiny_vit
from methods.repadapter import RepAdapterLinear
from supernet import load_space

M = methods.get("repadapter")
SPACE = load_space(LARGE_SPACE)


def _count_formula(d: int, h: int, g: int, adapters: int) -> int:
    # down: d·h weights + h biases; up: g groups of (h/g)·(d/g) weights + d biases
    return adapters * (d * h + h + (h // g) * (d // g) * g + d)


@pytest.mark.parametrize("dim,groups", [(8, 2), (16, 4), (8, 1)])
def test_count_on_vit_base_is_the_closed_formula(dim, groups):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=10)
    M.apply(model, M.settings(size=dim, groups=groups), SPACE)
    want = _count_formula(768, dim, groups, adapters=2 * 12)
    assert M.count(model) == want
    if (dim, groups) == (8, 2):
        assert want == 239_808  # 221,184 weights (the paper's 0.22 M) + 18,624 biases


def _random_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RepAdapterLinear):
                for p in (m.down.weight, m.down.bias, m.up_weight, m.up_bias):
                    if p is not None:
                        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.2)


def _adapted_f64(dim=4, groups=2, scale=0.7, seed=0, **vit_kw):
    torch.manual_seed(seed)
    base = tiny_vit(**vit_kw).double().eval()
    model = copy.deepcopy(base)
    M.apply(model, M.settings(size=dim, groups=groups, scale=scale), SPACE)
    _random_adapters(model, seed)
    return base, model.eval()


def _adapter_by_hand(x, a: RepAdapterLinear, scale):
    """x + s·(U·(D x + b_d) + b_u), the grouped U applied group by group."""
    z = x @ a.down.weight.T + a.down.bias
    d, hg = a.up_weight.shape
    g = a.groups
    dg = d // g
    outs = [z[..., k * hg:(k + 1) * hg] @ a.up_weight[k * dg:(k + 1) * dg].T for k in range(g)]
    return x + scale * (torch.cat(outs, -1) + a.up_bias)


def test_forward_of_a_block_is_the_papers_equation_in_float64():
    scale = 0.7
    _, model = _adapted_f64(dim=4, groups=2, scale=scale)
    blk = model.blocks[0]
    qkv, fc1 = blk.attn.qkv, blk.mlp.fc1
    assert isinstance(qkv, RepAdapterLinear) and isinstance(fc1, RepAdapterLinear)
    x = torch.randn(3, 17, 32, dtype=torch.float64)
    with torch.no_grad():
        got = blk(x)
        # attention on the adapted normed input
        h = F.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        h = _adapter_by_hand(h, qkv, scale) @ qkv.base.weight.T + qkv.base.bias
        B, N, heads, hd = 3, 17, 2, 16
        q, k, v = h.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / hd ** 0.5, -1) @ v
        att = att.transpose(1, 2).reshape(B, N, 32) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        y = x + att
        # MLP on the adapted normed input
        h = F.layer_norm(y, (32,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        h = _adapter_by_hand(h, fc1, scale) @ fc1.base.weight.T + fc1.base.bias
        want = y + F.gelu(h) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # and the adapter moved the output away from the base block's
    with torch.no_grad():
        plain = copy.deepcopy(blk)
        plain.attn.qkv, plain.mlp.fc1 = qkv.base, fc1.base
        assert (plain(x) - got).abs().max() > 1e-3


@pytest.mark.parametrize("dim,groups,scale", [(4, 2, 0.7), (8, 4, 3.0), (2, 1, -1.5)])
def test_merge_is_exact_in_float64_and_loads_strictly_into_plain_timm(dim, groups, scale):
    base, model = _adapted_f64(dim=dim, groups=groups, scale=scale, seed=dim)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        assert (want - base(x)).abs().max() > 1e-3  # the random adapters matter
        merged = M.merge(copy.deepcopy(model)).eval()
        assert not any(isinstance(m, RepAdapterLinear) for m in merged.modules())
        torch.testing.assert_close(merged(x), want, rtol=1e-10, atol=1e-10)
    plain = tiny_vit().double()
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), want, rtol=1e-10, atol=1e-10)


def test_bias_free_qkv_gets_a_bias_free_adapter_and_still_merges_strictly():
    base, model = _adapted_f64(dim=4, groups=2, qkv_bias=False)
    qkv = model.blocks[0].attn.qkv
    assert qkv.down.bias is None and qkv.up_bias is None
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        want = model(x)
        merged = M.merge(copy.deepcopy(model)).eval()
    plain = tiny_vit(qkv_bias=False).double()
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), want, rtol=1e-10, atol=1e-10)
    # per qkv adapter: no h + d biases
    d, h, g = 32, 4, 2
    assert M.count(model) == _count_formula(d, h, g, 4) - 2 * (h + d)


def test_starts_as_the_base_and_only_adapters_and_head_train():
    base, model = _adapted_f64()
    fresh = copy.deepcopy(base)
    M.apply(fresh, M.settings(size=4), SPACE)  # the method's own initialisation: up = 0
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), base(x), rtol=0, atol=0)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and all(".base." not in n for n in trainable)
    assert all(n.startswith("head.") or any(k in n for k in (".down.", ".up_weight", ".up_bias")) for n in trainable)
    assert fresh.blocks[0].attn.qkv.down.weight.abs().sum() > 0  # xavier, not zero


@pytest.mark.parametrize("args,field", [
    (dict(size=6, groups=4), "groups"), (dict(size=4, groups=0), "groups"), (dict(size=0), "dim"),
    (dict(size=4, scale=0.0), "scale"), (dict(size=4, scale=float("nan")), "scale"),
    (dict(size=4, dropout=1.0), "dropout"),
])
def test_bad_settings_are_refused(args, field):
    with pytest.raises(methods.MethodError, match=f"^{field}: "):
        M.settings(**args)


def test_groups_not_dividing_the_model_width_are_refused_in_one_line():
    model = tiny_vit()  # width 32
    with pytest.raises(methods.MethodError, match="groups: must divide the model's width") as err:
        M.apply(model, M.settings(size=6, groups=3), SPACE)
    assert "\n" not in str(err.value)


def test_non_vit_is_refused_in_one_line():
    with torch.device("meta"):
        model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(methods.MethodError, match="repadapter needs a timm VisionTransformer") as err:
        M.apply(model, M.settings(size=8), SPACE)
    assert "\n" not in str(err.value) and "ResNet" in str(err.value)
