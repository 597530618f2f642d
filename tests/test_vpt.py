"""VPT-Shallow and VPT-Deep (methods/vpt.py): parameter counts on ViT-B/16 against the closed
formulas, the forward against an independent float64 loop over hand-written blocks that inserts and
drops the prompt tokens, class-token and average pooling, gradient checkpointing, the init bound,
and refusals."""

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
from conftest import tiny_vit
from methods.vpt import PromptedBlock, init_bound


def _apply(name, model, tokens, **args):
    m = methods.get(name)
    m.apply(model, m.settings(size=tokens, **args), None)
    return m


def _prompts(model):
    return [b.prompt for b in model.blocks if b.prompt is not None]


@pytest.mark.parametrize("tokens", [10, 50])
@pytest.mark.parametrize("name,layers", [("vpt_shallow", 1), ("vpt_deep", 12)])
def test_counts_on_vit_b16_are_the_closed_formulas(name, layers, tokens):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=10)
    m = _apply(name, model, tokens)
    assert m.count(model) == layers * 768 * tokens  # Shallow 768·p, Deep 12·768·p
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prompts = {f"blocks.{i}.prompt" for i in range(layers)}
    assert trainable == prompts | {"head.weight", "head.bias"}
    assert all(p.device.type == "meta" for p in _prompts(model))


def _block(blk, x):
    """A pre-norm ViT block written out: x + Proj(MHSA(LN1 x)), then x + FC2(GELU(FC1(LN2 x)))."""
    assert isinstance(blk.ls1, nn.Identity) and isinstance(blk.attn.q_norm, nn.Identity)
    B, N, D = x.shape
    H = blk.attn.num_heads
    h = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)
    x = x + (a @ v).transpose(1, 2).reshape(B, N, D) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    h = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    return x + F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


def _reference(base, x, prompts, deep):
    """VPT's forward on the base model's own weights: [x, P, E] through hand-written blocks."""
    n = base.num_prefix_tokens
    p = prompts[0].shape[0]
    h = base.norm_pre(base._pos_embed(base.patch_embed(x)))
    B, N = h.shape[:2]

    def insert(h, P):
        return torch.cat([h[:, :n], P.expand(B, -1, -1), h[:, n:]], dim=1)

    def drop(h):
        return torch.cat([h[:, :n], h[:, n + p:]], dim=1)

    if not deep:
        h = insert(h, prompts[0])
    for i, blk in enumerate(base.blocks):
        h = insert(h, prompts[i]) if deep else h
        assert h.shape[1] == N + p
        h = _block(blk, h)
        h = drop(h) if deep else h
    h = h if deep else drop(h)
    h = _ln(base.norm, h)
    pooled = h[:, 0] if base.global_pool == "token" else h[:, n:].mean(dim=1)  # avg: patch tokens only
    return h, _ln(base.fc_norm, pooled) @ base.head.weight.T + base.head.bias


def _ln(norm, h):  # timm puts the final LayerNorm before the pool (token) or after it (avg: fc_norm)
    if isinstance(norm, nn.Identity):
        return h
    return F.layer_norm(h, (h.shape[-1],), norm.weight, norm.bias, norm.eps)


MODELS = {
    "cls-token": dict(),
    "cls+2 registers": dict(reg_tokens=2),
    "cls, avg pool": dict(global_pool="avg"),
    "no cls, avg pool, norm before pool": dict(class_token=False, global_pool="avg", fc_norm=False),
}


@pytest.mark.parametrize("kw", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("name", ["vpt_shallow", "vpt_deep"])
def test_forward_is_the_explicit_loop_that_inserts_and_drops_prompts(name, kw):
    torch.manual_seed(0)
    base = tiny_vit(depth=3, **kw).double().eval()
    model = copy.deepcopy(base)
    _apply(name, model, 3)
    prompts = _prompts(model)
    assert len(prompts) == (3 if name == "vpt_deep" else 1)
    with torch.no_grad():
        for P in prompts:
            P.copy_(torch.randn_like(P))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want_feats, want = _reference(base, x, [P.detach() for P in prompts], deep=name == "vpt_deep")
        feats = model.forward_features(x)
        got = model(x)
        base_out = base(x)
    assert feats.shape == base.forward_features(x).shape  # the head sees the base model's token layout
    torch.testing.assert_close(feats, want_feats, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got - base_out).abs().max() > 1e-6  # the prompts attend: not the base model


def test_shallow_prompts_reach_later_blocks_and_deep_prompts_are_replaced():
    torch.manual_seed(0)
    base = tiny_vit(depth=2).eval()
    shallow, deep = copy.deepcopy(base), copy.deepcopy(base)
    _apply("vpt_shallow", shallow, 2)
    _apply("vpt_deep", deep, 2)
    seen = {}
    for tag, model in (("shallow", shallow), ("deep", deep)):
        model.blocks[1].block.register_forward_pre_hook(lambda mod, args, tag=tag: seen.__setitem__(tag, args[0]))
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    n = base.num_prefix_tokens
    # block 1's input: Shallow carries block 0's outputs at the prompt positions, Deep its own fresh prompts
    torch.testing.assert_close(seen["deep"][0, n:n + 2], deep.blocks[1].prompt.detach())
    assert (seen["shallow"][0, n:n + 2] - shallow.blocks[0].prompt.detach()).abs().max() > 1e-3


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    model = tiny_vit(depth=2)
    _apply("vpt_deep", model, 2)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    block = model.blocks[0].block
    forward = block.forward
    monkeypatch.setattr(block, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    grads = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        calls.clear()
        model.zero_grad()
        model(x).square().sum().backward()
        assert len(calls) == (2 if ckpt else 1)  # recomputed in the backward pass
        grads.append([P.grad.clone() for P in _prompts(model)])
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b)


def test_init_is_the_papers_xavier_uniform_bound():
    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224", num_classes=10)
    assert init_bound(vit_b) == pytest.approx(math.sqrt(6 / (3 * 16 * 16 + 768)))  # 1/16
    torch.manual_seed(0)
    model = tiny_vit()
    _apply("vpt_deep", model, 20)
    v = math.sqrt(6 / (3 * 8 * 8 + 32))
    values = torch.cat([P.detach().flatten() for P in _prompts(model)])
    assert values.abs().max() <= v and values.abs().max() > 0.9 * v
    assert abs(values.mean()) < 0.1 * v


def test_prompt_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = tiny_vit()
    _apply("vpt_shallow", model, 4, dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model(x))
        assert torch.equal(model.eval()(x), model(x))


def test_settings_are_validated():
    m = methods.get("vpt_deep")
    assert m.size == "tokens" and m.arg_names() == ["dropout"]
    assert not m.mergeable and not m.starts_at_base and "(N+p)/N" in m.inference
    for bad in (0, -3, 2.0, True):
        with pytest.raises(methods.MethodError, match="^tokens: "):
            m.settings(size=bad)
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(methods.MethodError, match="^dropout: "):
            m.settings(size=4, dropout=bad)


@pytest.mark.parametrize("name", ["vpt_shallow", "vpt_deep"])
def test_a_cnn_is_refused_in_one_line(name):
    with torch.device("meta"):
        model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(methods.MethodError) as err:
        _apply(name, model, 4)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and "VisionTransformer" in msg and "ResNet" in msg


def test_applying_twice_is_refused():
    model = tiny_vit()
    _apply("vpt_shallow", model, 2)
    assert all(isinstance(b, PromptedBlock) for b in model.blocks)
    with pytest.raises(methods.MethodError, match="already"):
        _apply("vpt_deep", model, 2)
