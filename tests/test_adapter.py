"""Adapter and AdaptFormer: the parameter count on ViT-B/16 against the closed formula, one block's
forward against the papers' equations computed directly in float64, the refusal of a non-ViT, the
settings' checks and a strict reload of the adapted state dict (what adapted.safetensors needs)."""

import copy
import math

import pytest
import torch

import methods
from conftest import LARGE_SPACE, tiny_vit
from supernet import load_space


def _count_formula(depth: int, d: int, r: int) -> int:
    return depth * (2 * d * r + r + d)  # per block: down d x r + r, up r x d + d


@pytest.mark.parametrize("name", ["adapter", "adaptformer"])
@pytest.mark.parametrize("r", [8, 64])
def test_count_on_vit_base_is_the_closed_formula(name, r):
    import timm

    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=10)
    m = methods.get(name)
    m.apply(model, m.settings(size=r), load_space(LARGE_SPACE))
    assert m.count(model) == _count_formula(12, 768, r)
    if r == 8:
        assert m.count(model) == 156_768  # 0.157 M
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("head.")} == {
        f"blocks.{i}.mlp.adapter.{layer}.{t}" for i in range(12) for layer in ("down", "up") for t in ("weight", "bias")}


def _ln(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _reference_block(p: dict, a: dict, x: torch.Tensor, heads: int, name: str, s) -> torch.Tensor:
    """One pre-norm block with its adapter, from the base block's weights ``p`` and the adapter's ``a``;
    with LayerScale (``ls1.gamma``, ``ls2.gamma`` in ``p``) on the attention and the MLP branch."""
    g1, g2 = p.get("ls1.gamma", 1.0), p.get("ls2.gamma", 1.0)
    B, N, d = x.shape
    h = _ln(x, p["norm1.weight"], p["norm1.bias"])
    qkv = (h @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).reshape(B, N, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    o = (att @ v).transpose(1, 2).reshape(B, N, d) @ p["attn.proj.weight"].T + p["attn.proj.bias"]
    x1 = x + g1 * o
    z = _ln(x1, p["norm2.weight"], p["norm2.bias"])
    m = _gelu(z @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]

    def bottleneck(u, f):
        return f(u @ a["down.weight"].T + a["down.bias"]) @ a["up.weight"].T + a["up.bias"]

    if name == "adapter":  # Houlsby: h <- h + up(act(down(h))) on the MLP's output, inside its residual
        branch = m + bottleneck(m, _gelu if s.act == "gelu" else torch.relu)
    else:  # AdaptFormer: beside the MLP, on x' (the released code) or LN(x') (the paper's equation)
        branch = m + s.scale * bottleneck(z if s.norm_input else x1, torch.relu)
    return x1 + g2 * branch


CASES = [
    ("adapter", dict(act="gelu"), None),
    ("adapter", dict(act="relu"), 0.5),
    ("adaptformer", dict(), None),
    ("adaptformer", dict(scale=0.7, norm_input=True), None),
    ("adaptformer", dict(), 0.5),
]


@pytest.mark.parametrize("name,args,init_values", CASES)
def test_block_forward_is_the_papers_equation_in_float64(name, args, init_values):
    torch.manual_seed(0)
    base = tiny_vit(**({} if init_values is None else {"init_values": init_values})).double().eval()
    with torch.no_grad():
        for t in base.parameters():  # layer-scale gammas too, so that no two are alike
            t.add_(torch.randn_like(t) * 0.1)
    model = copy.deepcopy(base)
    m = methods.get(name)
    s = m.settings(size=3, **args)
    m.apply(model, s, load_space(LARGE_SPACE))
    model.eval()
    adapter = model.blocks[0].mlp.adapter
    with torch.no_grad():
        for t in adapter.parameters():  # a non-zero up-projection and biases
            t.copy_(torch.randn_like(t) * 0.3)
    p = dict(base.blocks[0].state_dict())
    assert ("ls2.gamma" in p) == (init_values is not None)
    a = dict(adapter.state_dict())
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    want = _reference_block(p, a, x, heads=2, name=name, s=s)
    with torch.no_grad():
        got = model.blocks[0](x)
        plain = base.blocks[0](x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got - plain).abs().max() > 1e-2, "the adapter must change the block's output"
    if name == "adaptformer" and not s.norm_input:  # the branch must see x', not LN(x')
        wrong = _reference_block(p, a, x, heads=2, name=name, s=m.settings(size=3, **{**args, "norm_input": True}))
        assert (got - wrong).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["adapter", "adaptformer"])
def test_a_non_vit_is_refused_in_one_line_and_left_alone(name):
    import timm

    with torch.device("meta"):
        model = timm.create_model("resnet18", num_classes=3)
    m = methods.get(name)
    with pytest.raises(methods.MethodError) as err:
        m.apply(model, m.settings(size=8), load_space(LARGE_SPACE))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{name}: needs a timm VisionTransformer") and msg.endswith("got ResNet")
    assert all(p.requires_grad for p in model.parameters())


def test_a_second_apply_is_refused():
    model = tiny_vit()
    m = methods.get("adapter")
    m.apply(model, m.settings(size=2), load_space(LARGE_SPACE))
    with pytest.raises(methods.MethodError, match="already holds an adapter"):
        methods.get("adaptformer").apply(model, methods.get("adaptformer").settings(size=2), load_space(LARGE_SPACE))


@pytest.mark.parametrize("name,args,match", [
    ("adapter", dict(act="tanh"), "act"),
    ("adapter", dict(dropout=1.0), "dropout"),
    ("adapter", dict(dim=True), "dim"),
    ("adaptformer", dict(scale=float("nan")), "scale"),
    ("adaptformer", dict(scale=True), "scale"),
    ("adaptformer", dict(norm_input="yes"), "norm_input"),
    ("adaptformer", dict(dim=2.5), "dim"),
])
def test_bad_settings_are_refused(name, args, match):
    with pytest.raises(methods.MethodError, match=f"^{match}: "):
        methods.get(name).settings(**args)


@pytest.mark.parametrize("name,args", [("adapter", {}), ("adaptformer", {}), ("adaptformer", {"norm_input": True})])
def test_the_adapted_state_reloads_strictly_into_a_fresh_adapted_model(name, args):
    m = methods.get(name)
    torch.manual_seed(0)
    trained = tiny_vit()
    m.apply(trained, m.settings(size=2, **args), load_space(LARGE_SPACE))
    with torch.no_grad():
        for t in trained.parameters():
            if t.requires_grad:
                t.add_(torch.randn_like(t))
    fresh = tiny_vit()
    m.apply(fresh, m.settings(size=2, **args), load_space(LARGE_SPACE))
    fresh.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), trained.eval()(x))
