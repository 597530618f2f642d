"""GLoRA on nn.Conv2d (supernet/conv.py, docs/convolutions.md): the dense formula for every configuration
of the largest space on every kind of convolution, merging, model surgery, adapters, autocast, PEFT's
LoRA for Conv2d as an oracle."""

import copy
import itertools

import pytest
import timm
import torch
import torch.nn as nn
from torch.func import functional_call

import models
from conftest import LARGE_SPACE, assert_same_grads, needs_cxx
from supernet import (TENSORS, GLoraConv2d, GLoraLinear, LayerChoice, SpaceError, SubnetSampler, apply_glora, count_params,
                      extract_subnet, find_targets, glora_layers, load_adapter, load_merged, load_space, merge_glora,
                      sample_subnet, save_adapter, set_subnet, uniform_subnet)
from supernet.layer import choice_cost

CHOICES = load_space(LARGE_SPACE).choices


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread. Two threads on a busy two-core machine wait ~36 ms at
    every parallel convolution's barrier (measured), which made the matrix below take minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conv2d_same(*args, **kw):
    from timm.layers import Conv2dSame

    return Conv2dSame(*args, **kw)


# (id, builder(bias), input size): every kind of convolution a timm CNN has
GEOMETRIES = [
    ("3x3-s2-p1", lambda bias: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias), 7),
    ("3x2-dil2-reflect", lambda bias: nn.Conv2d(4, 5, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2, padding_mode="reflect", bias=bias), 8),
    ("1x1", lambda bias: nn.Conv2d(6, 4, 1, bias=bias), 5),
    ("grouped-g2", lambda bias: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=bias), 6),
    ("depthwise-x2-same", lambda bias: nn.Conv2d(4, 8, 3, padding="same", groups=4, bias=bias), 6),
    ("depthwise-same-dynamic", lambda bias: _conv2d_same(4, 4, 3, stride=2, groups=4, bias=bias), 7),
]


def _layer(build, bias: bool, seed: int, choices=CHOICES):
    torch.manual_seed(0)
    base = build(bias).double()
    layer = GLoraConv2d(copy.deepcopy(base), choices)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return base, layer, gen


def _dense_weight_bias(base: nn.Conv2d, s):
    """docs/method.md §1 on the weight viewed (out, in/groups·kh·kw): W0 + W0 ⊙ A + B, and
    b0 + b0 ⊙ D + E + W0 C with (W0 C)[o] summed over o's group's input channels and the kernel."""
    W0 = base.weight
    out, per = W0.shape[0], W0.shape[1]
    Wm = W0.reshape(out, -1)
    W = (Wm + Wm * s.A + s.B).view_as(W0)
    b0 = base.bias if base.bias is not None else torch.zeros(out, dtype=W0.dtype)
    # output channel o reads the input channels of its group, [k·per, (k+1)·per) with k = o // (out/groups)
    c_of_o = s.C.view(base.groups, per).repeat_interleave(out // base.groups, dim=0)  # (out, per)
    return W, b0 + b0 * s.D + s.E + (W0.sum((2, 3)) * c_of_o).sum(1)


def _with_bias(base: nn.Conv2d) -> nn.Conv2d:
    ref = copy.deepcopy(base)
    if ref.bias is None:
        ref.bias = nn.Parameter(torch.zeros(ref.out_channels, dtype=ref.weight.dtype))
    return ref


def _reference(ref: nn.Conv2d, W, b, x):
    """The base layer's own forward (its padding, dynamic or not) with weight W and bias b."""
    return functional_call(ref, {"weight": W, "bias": b}, (x,))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("build,size", [g[1:] for g in GEOMETRIES], ids=[g[0] for g in GEOMETRIES])
def test_every_configuration_matches_dense_formula(build, size, bias):
    """float64: outputs, merged weights and the gradients of x and of every shared parameter (slices
    of the max-rank tensors: lora4 is a slice of lora8's) equal the dense formula, for all 900 (300
    without a bias) configurations."""
    base, layer, gen = _layer(build, bias, seed=1)
    params = layer.adapter_parameters()
    names = [n for n, _ in layer.named_parameters() if n.startswith("glora_")]
    x = torch.randn(2, base.in_channels, size, size + 1, generator=gen, dtype=torch.float64, requires_grad=True)
    y0 = base(x)
    w = torch.randn(y0.shape, generator=gen, dtype=torch.float64)
    combos = list(itertools.product(*(layer.choices[t] for t in TENSORS)))
    assert len(combos) == (900 if bias else 300)
    changed = 0
    ref = _with_bias(base)
    for combo in combos:
        c = LayerChoice(*combo)
        layer.set_choice(c)
        y = layer(x)
        W, b = _dense_weight_bias(base, layer.support_tensors())
        want = _reference(ref, W, b, x)
        assert y.shape == want.shape and (y - want).abs().max().item() <= 1e-10, str(c)
        changed += (y - y0).abs().max().item() > 1e-3
        Wm, bm = layer.merged_weight_bias()
        bm = torch.zeros_like(b) if bm is None else bm
        assert (Wm - W).abs().max().item() <= 1e-12 and (bm - b).abs().max().item() <= 1e-12, str(c)
        assert (_reference(ref, Wm, bm, x) - want).abs().max().item() <= 1e-10, str(c)
        assert_same_grads(y, want, w, [x, *params], ["x"] + names, str(c))
    assert changed > len(combos) // 2


@pytest.mark.parametrize("build,size", [g[1:] for g in GEOMETRIES], ids=[g[0] for g in GEOMETRIES])
def test_fresh_layer_equals_base_and_merges_into_plain_conv(build, size):
    torch.manual_seed(0)
    base = build(True)
    layer = GLoraConv2d(copy.deepcopy(base), CHOICES)
    x = torch.randn(2, base.in_channels, size, size)
    for combo in itertools.product(*(layer.choices[t] for t in TENSORS)):
        layer.set_choice(LayerChoice(*combo))
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    merged = merge_glora(nn.Sequential(layer))[0]
    assert type(merged) is type(base) and not isinstance(merged, GLoraConv2d)
    merged.load_state_dict(base.state_dict(), strict=True)


def test_choice_costs_use_kernel_columns():
    """A, B count out and in/groups·kh·kw; C counts the input channels; D, E out."""
    layer = GLoraConv2d(nn.Conv2d(8, 12, 3, groups=2), CHOICES)
    cols = 8 // 2 * 9
    assert (layer.rows, layer.cols, layer.c_rows) == (12, cols, 8)
    assert layer.glora_Ad.shape == (12, 8) and layer.glora_Au.shape == (8, cols)
    assert layer.glora_Cd.shape == (8, 8) and layer.glora_Cu.shape == (8, 1)
    c = LayerChoice.parse(dict(A="lora4", B="vector", C="lora8", D="scalar", E="vector"))
    assert layer.cost(c) == 4 * (12 + cols) + 12 + 8 * (8 + 1) + 1 + 12
    assert layer.choice_cost("C", c.C) == choice_cost("C", c.C, 12, cols, 8) == 8 * 9
    assert layer.choice_cost("A", c.A) == choice_cost("A", c.A, 12, cols)


def test_initialisation_follows_spec():
    layer = GLoraConv2d(nn.Conv2d(3, 5, 3), CHOICES)
    for t in "ABC":
        assert torch.count_nonzero(getattr(layer, f"glora_{t}d")) == 0
        up = getattr(layer, f"glora_{t}u")
        assert torch.count_nonzero(up) == up.numel()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


def test_refuses_what_would_not_merge():
    from timm.layers import StdConv2d

    with pytest.raises(SpaceError, match="StdConv2d.*own forward"):
        GLoraConv2d(StdConv2d(3, 4, 3), CHOICES)
    with pytest.raises(SpaceError, match="Linear, not an nn.Conv2d"):
        GLoraConv2d(nn.Linear(3, 4), CHOICES)
    layer = GLoraConv2d(nn.Conv2d(3, 4, 3, bias=False), CHOICES)
    with pytest.raises(SpaceError, match=r"conv\.D.*no bias"):
        layer.set_choice(dict(A="none", B="none", C="none", D="vector", E="none"), "conv")


# -- targets --------------------------------------------------------------------------------
def _space(targets, **extra):
    return {"targets": targets, "choices": {t: [str(c) for c in CHOICES[t]] for t in TENSORS}, **extra}


def test_targets_kinds_on_convnext():
    model = models.convnext()
    linear = find_targets(model, load_space(_space("all-linear")))
    conv = find_targets(model, load_space(_space("all-conv")))
    both = find_targets(model, load_space(_space("all")))
    assert linear and conv and set(both) == set(linear) | set(conv) and not set(linear) & set(conv)
    assert all(isinstance(model.get_submodule(n), nn.Conv2d) for n in conv)
    assert "head.fc" not in both  # the classifier stays out
    assert "stem.0" in conv and any(n.endswith("conv_dw") for n in conv)
    # a pattern that matches convolutions adapts them
    assert find_targets(model, load_space(_space(["conv_dw"]))) == [n for n in conv if n.endswith("conv_dw")]


def test_vit_default_targets_leave_the_patch_embedding_alone():
    vit = models.vit()
    names = find_targets(vit, load_space(LARGE_SPACE))
    assert "patch_embed.proj" not in names and all(isinstance(vit.get_submodule(n), nn.Linear) for n in names)
    assert "patch_embed.proj" in find_targets(vit, load_space(_space("all")))


def test_unmergeable_convs_are_named():
    model = timm.create_model("resnetv2_50x1_bit", num_classes=3)  # StdConv2d throughout
    with pytest.raises(SpaceError, match=r"targets: 'all-conv': stem.conv is a StdConv2d.*exclude"):
        find_targets(model, load_space(_space("all-conv")))
    with pytest.raises(SpaceError, match=r"matches stem.conv, a StdConv2d"):
        find_targets(model, load_space(_space(["stem.conv"])))
    with pytest.raises(SpaceError, match=r"targets: 'all-conv' matched no nn.Conv2d"):
        find_targets(models.mlp(), load_space(_space("all-conv")))


def test_space_targets_words():
    for word in ("all-linear", "all-conv", "all"):
        assert load_space(_space(word)).targets == word
    with pytest.raises(SpaceError, match="'all-linear', 'all-conv', 'all' or a list"):
        load_space(_space(3))
    conv_space = load_space(pytest.importorskip("pathlib").Path(LARGE_SPACE).parent / "conv.yaml")
    assert conv_space.targets == "all" and conv_space.choices == CHOICES


# -- whole CNNs -----------------------------------------------------------------------------
def _cnn(name):
    torch.manual_seed(0)
    if name == "convnext":
        return models.convnext(num_classes=4).eval()
    return timm.create_model(name, num_classes=4).eval()


CNNS = ["test_efficientnet", "tf_mobilenetv3_small_minimal_100", "convnext", "test_resnet"]


def _randomise(model, scale=0.05):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "glora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("name", CNNS)
def test_cnn_supernet_trains_adapters_and_head_only(name):
    model = apply_glora(_cnn(name), _space("all"))
    convs = [n for n, m in glora_layers(model) if isinstance(m, GLoraConv2d)]
    assert convs
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = model.glora_modules_to_save
    assert trainable and all("glora_" in n or any(n.startswith(h + ".") for h in heads) for n in trainable)
    assert any(n.startswith(convs[0] + ".glora_") for n in trainable)
    sample_subnet(model, torch.Generator().manual_seed(0))
    _randomise(model)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    loss = model(x).logsumexp(-1).mean()
    assert torch.isfinite(loss)
    loss.backward()
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_grads
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith(convs[0] + ".glora_"))


@pytest.mark.parametrize("name", CNNS)
def test_cnn_merge_extract_count_and_adapter_files(name, tmp_path):
    base = _cnn(name)
    model = apply_glora(copy.deepcopy(base), _space("all"))
    _randomise(model)
    config = sample_subnet(model, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert (want - base(x)).abs().max() > 1e-4
        # count_params: the sum of docs/method.md §2 table with each layer's sizes, the head apart
        n = count_params(model, config)
        assert n.adapter == sum(layer.cost(config[ln]) for ln, layer in glora_layers(model)) > 0
        # extract: only the chosen tensors, same outputs, same count (now every tensor is used whole)
        small = extract_subnet(copy.deepcopy(model), config)
        torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-5)
        assert count_params(small).adapter == n.adapter
        assert sum(p.numel() for ln, layer in glora_layers(small) for p in layer.adapter_parameters()) == n.adapter
        # adapter files round-trip onto a fresh model
        save_adapter(small, tmp_path / "a.safetensors")
        loaded = load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors")
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
        # merge: plain convolutions of the base layers' own kinds, strict into a fresh timm model
        merged = merge_glora(copy.deepcopy(small))
        assert not list(glora_layers(merged))
        for ln, _ in glora_layers(small):
            assert type(merged.get_submodule(ln)) is type(base.get_submodule(ln))
        torch.testing.assert_close(merged(x), want, rtol=1e-4, atol=1e-4)
        fresh = load_merged(_cnn(name), merged.state_dict())
        torch.testing.assert_close(fresh(x), want, rtol=1e-4, atol=1e-4)


def test_load_adapter_refuses_other_convolution():
    base = _cnn("test_efficientnet")
    model = extract_subnet(apply_glora(copy.deepcopy(base), _space(["conv_stem"])), None)
    import tempfile
    from pathlib import Path

    from supernet import AdapterError

    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, Path(d) / "a.safetensors")
        other = copy.deepcopy(base)
        other.conv_stem = nn.Conv2d(3, other.conv_stem.out_channels, 3, stride=1, padding=1, bias=False)
        with pytest.raises(AdapterError, match=r"conv_stem: model and file differ: stride \[1, 1\] vs file \[2, 2\]"):
            load_adapter(other, Path(d) / "a.safetensors")


def test_sampler_draws_what_sample_subnet_draws_on_a_cnn():
    model = apply_glora(_cnn("convnext"), _space("all"))
    a = [sample_subnet(model, g, activate=False) for g in [torch.Generator().manual_seed(5)] for _ in range(3)]
    sampler, g = SubnetSampler(model), torch.Generator().manual_seed(5)
    b = [sampler(g) for _ in range(3)]
    assert a == b
    assert {ln: layer.active for ln, layer in glora_layers(model)} == b[-1]
    model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", ["test_efficientnet", "convnext"])
def test_bf16_autocast_is_finite_and_close(name):
    model = apply_glora(_cnn(name), _space("all"))
    _randomise(model, 0.1)
    x = torch.randn(2, 3, 32, 32)
    for seed in range(3):
        sample_subnet(model, torch.Generator().manual_seed(seed))
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert (got.float() - want).abs().max() <= 0.05 * want.abs().max() + 0.05
        loss = got.float().sum()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_b_lora_only_matches_peft_lora_conv():
    """PEFT's LoRA for Conv2d with the same factors (scaling 1) is our B = lora8, every other tensor none."""
    peft = pytest.importorskip("peft")
    base = _cnn("test_efficientnet")
    targets = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    ours = apply_glora(copy.deepcopy(base), {"targets": [rf"^{t}$".replace(".", r"\.") for t in targets], "choices": {
        "A": ["none"], "B": ["lora8"], "C": ["none"], "D": ["none"], "E": ["none"]}})
    _randomise(ours)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets, lora_dropout=0.0),
                                          copy.deepcopy(base)).eval()
    with torch.no_grad():
        for ln, layer in glora_layers(ours):
            pl = theirs.get_submodule(ln)
            assert pl.scaling["default"] == 1.0
            pl.lora_A["default"].weight.copy_(layer.glora_Bu.view_as(pl.lora_A["default"].weight))
            pl.lora_B["default"].weight.copy_(layer.glora_Bd.view_as(pl.lora_B["default"].weight))
        x = torch.randn(2, 3, 32, 32)
        got, want = ours(x), theirs(x)
    assert (got - base(x)).abs().max() > 1e-3
    assert (got - want).abs().max().item() <= 1e-5


def test_linear_layers_unchanged_in_all():
    """targets: all wraps linear layers as GLoraLinear, convolutions as GLoraConv2d."""
    model = apply_glora(models.convnext(), _space("all"))
    kinds = {type(m) for _, m in glora_layers(model)}
    assert kinds == {GLoraLinear, GLoraConv2d}
    uniform = uniform_subnet(model, dict(A="vector", B="lora4", C="vector", D="vector", E="scalar"))
    set_subnet(model, uniform)
    assert count_params(model).adapter > 0


def test_adapter_files_carry_batch_norm_statistics(tmp_path):
    """Training in train mode moves a CNN's batch-norm running statistics (buffers: the frozen
    backbone's parameters stay); the adapter file keeps them, so a supernet or sub-network loaded
    onto a fresh model (search, retrain) is the network that was trained."""
    base = _cnn("test_efficientnet")
    model = apply_glora(copy.deepcopy(base), _space("all"))
    _randomise(model)
    sample_subnet(model, torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32) * 3 + 1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    save_adapter(model, tmp_path / "s.safetensors")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "s.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if "bn" in n)


@needs_cxx
def test_compiled_conv_layers_match_eager():
    """retrain.compile and search.compile on a CNN: each forward path (dense weight, scaled output,
    two-convolution lora B, ones-kernel B, grouped, TF 'SAME', reflect) compiles to the eager outputs
    and gradients."""
    picks = [dict(A="lora4", B="lora4", C="vector", D="vector", E="scalar"), dict(A="vector", B="lora4", C="lora4", D="scalar", E="vector"),
             dict(A="scalar", B="vector", C="none", D="none", E="vector"), dict(A="none", B="scalar", C="vector", D="vector", E="none"),
             dict(A="vector", B="lora4", C="none", D="none", E="none")]
    convs = [nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=2), _conv2d_same(4, 4, 3, groups=4, bias=False),
             nn.Conv2d(4, 4, 1, padding_mode="reflect"), nn.Conv2d(4, 4, 3, padding=1, groups=4)]
    layers = []
    for conv, pick in zip(convs, picks):
        pick = dict(pick, D="none") if conv.bias is None else pick
        layer = GLoraConv2d(conv, {t: [c] for t, c in pick.items()})
        layer.set_choice(pick)
        layers.append(layer)
    model = nn.Sequential(*layers)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x = torch.randn(2, 4, 8, 8)
    results = []
    for run in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = run(xi)
        (y * y).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    assert len(results[0]) == 2 + 23  # y, x and every adapter tensor
    for eager, compiled in zip(*results):
        assert eager.norm() > 0
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5 * eager.abs().max().item())


def test_channels_last_model():
    """timm trains CNNs in channels_last: a non-contiguous frozen weight takes every path."""
    model = apply_glora(_cnn("test_efficientnet"), _space("all"))
    _randomise(model)
    x = torch.randn(2, 3, 32, 32)
    for seed in range(3):
        sample_subnet(model, torch.Generator().manual_seed(seed))
        want = model(x)
        got = copy.deepcopy(model).to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
