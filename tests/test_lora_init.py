"""PiSSA and LoRA-GA on GLoRA's low-rank tensors, in offset form ``s (Xd Xu − Xd⁰ Xu⁰)``
(supernet.GLoraLayer.set_lora_init, methods/lorafamily/apply.py, docs/lora-family.md): the start is
the base model bit for bit, the forward and gradients equal the dense formula, the gradients are
those of the layer without offsets, merges, extraction and files keep the function, PiSSA agrees
with PEFT's, LoRA-GA's gradient with autograd on the plain timm model."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import methods
from conftest import LARGE_SPACE, assert_same_grads, tiny_vit
from methods.lorafamily.apply import estimate_weight_grads, init_lora_ga, init_pissa, lora_ga_direction
from methods.lorafamily.init import lora_ga_factors, pissa_factors
from supernet import (TENSORS, AdapterError, GLoraConv2d, GLoraLinear, LayerChoice, LoraScaling, SpaceError, SubnetSampler,
                      apply_glora, extract_subnet, glora_layers, load_adapter, load_space, merge_glora, save_adapter,
                      SupportTensors, set_subnet, uniform_subnet)
from test_conv import _dense_weight_bias, _reference, _with_bias
from test_supernet_layer import _dense_output

F64 = torch.float64
CHOICES = {"A": ["lora2", "lora4", "vector", "none"], "B": ["lora2", "lora4", "scalar", "none"],
           "C": ["lora4", "vector", "none"], "D": ["vector", "none"], "E": ["scalar"]}
LORA_ONLY = {"A": ["none"], "B": ["lora4"], "C": ["none"], "D": ["none"], "E": ["none"]}


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn_like(p, gen, scale=0.5):
    return torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale


def _offset_init(layer, gen, tensors="ABC"):
    """Random initial factors (the layer's own, as a data-aware init would set) for each low-rank tensor."""
    for t in tensors:
        if getattr(layer, f"glora_{t}u") is not None:
            d, u = getattr(layer, f"glora_{t}d"), getattr(layer, f"glora_{t}u")
            layer.set_lora_init(t, "pissa" if t == "B" else "lora_ga", _randn_like(d, gen), _randn_like(u, gen))


@torch.no_grad()
def _step(model, gen, size=0.1):
    """A random "training step" on every adapter parameter: the offsets no longer cancel."""
    for _, layer in glora_layers(model) if not isinstance(model, (GLoraLinear, GLoraConv2d)) else [("", model)]:
        for p in layer.adapter_parameters():
            p.add_(_randn_like(p, gen, size))


def _support(layer, c, scaling):
    """docs/method.md §2 in offset form, from the raw parameters and buffers: A, B as (rows, cols)
    (or broadcastable), C (c_rows, 1), D, E (rows,). Vector and scalar A, B, C are less their initial value too."""
    def s(ch):
        if scaling is None or ch.kind != "lora":
            return 1.0
        return scaling.scale(ch.rank)

    def lowrank(t):
        ch = c[t]
        d, u = getattr(layer, f"glora_{t}d"), getattr(layer, f"glora_{t}u")
        d0 = layer._buffers.get(f"glora_{t}d0")
        u0 = layer._buffers.get(f"glora_{t}u0")
        if d0 is None:
            d0, u0 = torch.zeros_like(d), None if u is None else torch.zeros_like(u)
        if ch.kind == "lora":
            k = ch.rank
            return s(ch) * (d[:, :k] @ u[:k] - d0[:, :k] @ u0[:k])
        if ch.kind == "vector":
            return d[:, :1] - d0[:, :1]
        if ch.kind == "scalar":
            return d[:1, :1] - d0[:1, :1]
        return torch.zeros(1, 1, dtype=F64) if t != "C" else torch.zeros(layer.c_rows, 1, dtype=F64)

    def vec(t):
        ch, p = c[t], getattr(layer, f"glora_{t}")
        return p if ch.kind == "vector" else p[:1].expand(layer.rows) if ch.kind == "scalar" else torch.zeros(layer.rows, dtype=F64)

    return SupportTensors(lowrank("A"), lowrank("B"), lowrank("C"), vec("D"), vec("E"))


def _combos(layer):
    return [LayerChoice(*combo) for combo in itertools.product(*(layer.choices[t] for t in TENSORS))]


# -- one layer: the formula, the gradients, the start ---------------------------------------------

@pytest.mark.parametrize("scaling", [None, LoraScaling(6.0, use_rslora=True)], ids=["s1", "rslora6"])
def test_linear_offset_layer_matches_dense_formula(scaling):
    """float64, every choice: output, support tensors, merge and every gradient equal the dense formula
    with ``s (Xd Xu − Xd⁰ Xu⁰)`` (lora) and ``Xd[:, :1] − Xd⁰[:, :1]`` (vector, scalar); the factor
    gradients are those of the same layer without offsets (the offset is a constant)."""
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()
    layer = GLoraLinear(base, CHOICES, lora_scaling=scaling)
    plain = GLoraLinear(copy.deepcopy(base), CHOICES, lora_scaling=scaling)
    gen = _gen(1)
    _offset_init(layer, gen)
    _step(layer, gen, 0.3)
    with torch.no_grad():
        for p, q in zip(plain.adapter_parameters(), layer.adapter_parameters()):
            p.copy_(q)
    assert layer.lora_init == {"A": "lora_ga", "B": "pissa", "C": "lora_ga"} and not plain.lora_init
    params, names = layer.adapter_parameters(), [n for n, _ in layer.named_parameters() if n.startswith("glora_")]
    x = torch.randn(3, 4, 7, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(3, 4, 5, generator=gen, dtype=F64)
    moved = 0
    for c in _combos(layer):
        layer.set_choice(c)
        plain.set_choice(c)
        support = _support(layer, c, scaling)
        for got, want in zip(layer.support_tensors(), support):
            torch.testing.assert_close(got.expand_as(want), want, atol=1e-12, rtol=0)
        want = _dense_output(x, base.weight, base.bias, *support)
        y = layer(x)
        assert (y - want).abs().max().item() <= 1e-10, str(c)
        Wm, bm = layer.merged_weight_bias()
        assert ((x @ Wm.T + bm) - want).abs().max().item() <= 1e-10, str(c)
        assert_same_grads(y, want, w, [x, *params], ["x"] + names, str(c))
        got = torch.autograd.grad((layer(x) * w).sum(), params, allow_unused=True)
        ref = torch.autograd.grad((plain(x) * w).sum(), plain.adapter_parameters(), allow_unused=True)
        for n, g, e in zip(names, got, ref):
            assert (g is None) == (e is None) and (g is None or (g - e).abs().max().item() <= 1e-12), f"{c}: {n}"
        moved += (y - plain(x)).abs().max().item() > 1e-3
    assert moved > len(_combos(layer)) // 2  # the offsets do change the function


def test_linear_start_is_bit_exact():
    """float32, every choice: after set_lora_init the output and the input gradient are those of the
    same layer before (LoRA's zero start), bit for bit."""
    torch.manual_seed(0)
    layer = GLoraLinear(nn.Linear(12, 10), CHOICES, lora_scaling=LoraScaling(8.0))
    gen = _gen(2)
    x = torch.randn(4, 3, 12, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, 10, generator=gen)
    before = {}
    for c in _combos(layer):
        layer.set_choice(c)
        y = layer(x)
        before[c] = (y.detach(), torch.autograd.grad((y * w).sum(), x)[0])
    _offset_init(layer, gen)
    assert (layer.glora_Bd != 0).any()
    for c in _combos(layer):
        layer.set_choice(c)
        y = layer(x)
        assert torch.equal(y, before[c][0]), str(c)
        assert torch.equal(torch.autograd.grad((y * w).sum(), x)[0], before[c][1]), str(c)


def test_default_layer_is_unchanged():
    """No init: no buffers, the same state dict keys, the forward passes the parameters only."""
    layer = GLoraLinear(nn.Linear(6, 4), CHOICES)
    assert not layer.lora_init and not layer._lora_offsets and not list(layer.buffers())
    keys = set(layer.state_dict())
    _offset_init(layer, _gen(0), "B")
    assert set(layer.state_dict()) - keys == {"glora_Bd0", "glora_Bu0"}
    assert layer.glora_Bd0.shape == layer.glora_Bd.shape and not layer.glora_Bd0.requires_grad
    assert all(p.requires_grad for p in layer.adapter_parameters()) and len(layer.adapter_parameters()) == 8  # the buffers are not parameters
    layer.clear_lora_init()
    assert set(layer.state_dict()) == keys and not layer._lora_offsets


def test_set_lora_init_errors():
    layer = GLoraLinear(nn.Linear(6, 4), CHOICES)
    d, u = layer.glora_Bd.detach(), layer.glora_Bu.detach()
    with pytest.raises(SpaceError, match="no low-rank choice"):
        GLoraLinear(nn.Linear(6, 4), {**CHOICES, "B": ["vector"]}).set_lora_init("B", "pissa", d, u)
    with pytest.raises(SpaceError, match="kind must be one of pissa, lora_ga"):
        layer.set_lora_init("B", "olora", d, u)
    with pytest.raises(SpaceError, match="tensor must be A, B or C"):
        layer.set_lora_init("D", "pissa", d, u)
    with pytest.raises(ValueError, match=r"glora_Bd has shape \(4, 4\), got \(4, 2\)"):
        layer.set_lora_init("B", "pissa", d[:, :2], u)
    assert not layer.lora_init


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                         nn.Conv2d(8, 6, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_conv_offset_layer_matches_dense_formula_and_starts_exactly():
    """float64, every choice, an ungrouped (low-rank B on the activations) and a grouped (dense weight)
    convolution: the start equals the base output, the offset layer the dense formula, its gradients too."""
    net = _conv_net().double()
    for idx in (0, 2):
        base = net[idx]
        layer = GLoraConv2d(copy.deepcopy(base), CHOICES, lora_scaling=LoraScaling(4.0))
        gen = _gen(idx)
        x = torch.randn(2, base.in_channels, 6, 7, generator=gen, dtype=F64, requires_grad=True)
        before = {}
        for c in _combos(layer):
            layer.set_choice(c)
            before[c] = layer(x).detach()
        _offset_init(layer, gen)
        for c in _combos(layer):
            layer.set_choice(c)
            torch.testing.assert_close(layer(x), before[c], rtol=0, atol=0, msg=f"{idx} {c}")
        _step(layer, gen, 0.3)
        params, names = layer.adapter_parameters(), [n for n, _ in layer.named_parameters() if n.startswith("glora_")]
        ref = _with_bias(base)
        w = torch.randn(before[c].shape, generator=gen, dtype=F64)
        for c in _combos(layer):
            layer.set_choice(c)
            W, b = _dense_weight_bias(base, _support(layer, c, LoraScaling(4.0)))
            want = _reference(ref, W, b, x)
            y = layer(x)
            assert (y - want).abs().max().item() <= 1e-10, f"{idx} {c}"
            Wm, bm = layer.merged_weight_bias()
            assert (Wm - W).abs().max().item() <= 1e-12 and (bm - b).abs().max().item() <= 1e-12, f"{idx} {c}"
            assert_same_grads(y, want, w, [x, *params], ["x"] + names, f"{idx} {c}")


# -- PiSSA ------------------------------------------------------------------------------------------

def test_pissa_on_the_lora_preset_starts_at_the_timm_model_and_is_w0_rank_r():
    torch.manual_seed(0)
    base = tiny_vit().eval()
    lora = methods.get("lora")
    model = lora.apply(copy.deepcopy(base), lora.settings(size=4), load_space(LARGE_SPACE), lora_scaling=LoraScaling(8.0))
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=_gen(0))
    want = base(x)
    report = init_pissa(model)
    layers = dict(glora_layers(model))
    assert set(report.layers) == set(layers) and str(report) == \
        f"PiSSA init (offset form): B on {len(layers)} layers"  # the lora preset has no low-rank A or C to name
    assert torch.equal(model(x), want)  # bit for bit
    for name, layer in layers.items():
        assert layer.lora_init == {"B": "pissa"}
        W0 = layer.weight.detach().double()
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        got = 2.0 * layer.glora_Bd0.double() @ layer.glora_Bu0.double()  # s = 8 / 4
        assert (got - best).abs().max().item() <= 1e-5 * S[0].item(), name
        assert torch.equal(layer.glora_Bd0, layer.glora_Bd) and torch.equal(layer.glora_Bu0, layer.glora_Bu)
    # merged = unmerged after a step
    _step(model, _gen(1), 0.05)
    y = model(x)
    assert (y - want).abs().max() > 1e-3
    torch.testing.assert_close(merge_glora(copy.deepcopy(model))(x), y, rtol=0, atol=1e-5)


def test_pissa_supernet_every_sampled_subnet_starts_at_base():
    torch.manual_seed(0)
    model = apply_glora(tiny_vit(), LARGE_SPACE).eval()
    for i, (_, layer) in enumerate(glora_layers(model)):  # trained A, C, D, E: the start is the model before PiSSA
        with torch.no_grad():
            for n, p in layer.named_parameters():
                if n.startswith("glora_") and not n.startswith("glora_B"):
                    p.copy_(_randn_like(p, _gen(i), 0.05))
    x = torch.randn(2, 3, 32, 32, generator=_gen(0))
    sampler, gen = SubnetSampler(model), _gen(5)
    configs = [sampler(gen, activate=False) for _ in range(6)]
    configs.append(uniform_subnet(model, {"A": "lora8", "B": "lora4", "C": "lora8", "D": "vector", "E": "vector"}))
    configs.append(uniform_subnet(model, {"A": "vector", "B": "vector", "C": "vector", "D": "scalar", "E": "none"}))
    before = []
    for cfg in configs:
        set_subnet(model, cfg)
        before.append(model(x))
    report = init_pissa(model)
    assert str(report).startswith("PiSSA init (offset form): B on ")
    sampler, gen = SubnetSampler(model), _gen(5)  # the same draws, with a fresh sampler
    for cfg, want in zip(configs, before):
        drawn = sampler(gen) if cfg is not configs[-2] and cfg is not configs[-1] else set_subnet(model, cfg)
        assert drawn == cfg
        assert torch.equal(model(x), want), cfg


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_matches_peft(use_rslora):
    """PEFT's residual W_res + s·B A equals our W0 + s(Bd Bu − Bd⁰ Bu⁰), at the start and after a step."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))
    r, alpha = 3, 6
    ours = apply_glora(copy.deepcopy(base), {"targets": ["0"], "choices": {**LORA_ONLY, "B": [f"lora{r}"]}},
                       modules_to_save=None, lora_scaling=LoraScaling(alpha, use_rslora))
    init_pissa(ours)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["0"], init_lora_weights="pissa")
    theirs = peft.inject_adapter_in_model(cfg, copy.deepcopy(base))
    pl, gl = theirs[0], ours[0]
    s = pl.scaling["default"]
    B, A = pl.lora_B["default"].weight.detach(), pl.lora_A["default"].weight.detach()
    torch.testing.assert_close(s * gl.glora_Bd0 @ gl.glora_Bu0, s * B @ A, rtol=0, atol=1e-5)  # sign-free
    torch.testing.assert_close(pl.base_layer.weight.detach(), base[0].weight - s * gl.glora_Bd0 @ gl.glora_Bu0, rtol=0, atol=1e-5)
    x = torch.randn(5, 10, generator=_gen(4))
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
    with torch.no_grad():  # the same factors (ours, up to PEFT's signs), then the same step on both
        pl.lora_B["default"].weight.copy_(gl.glora_Bd)
        pl.lora_A["default"].weight.copy_(gl.glora_Bu)
        for p, q in ((gl.glora_Bd, pl.lora_B["default"].weight), (gl.glora_Bu, pl.lora_A["default"].weight)):
            step = 0.1 * torch.randn(p.shape, generator=_gen(p.numel()))
            p.add_(step)
            q.add_(step)
    assert (ours(x) - base(x)).abs().max() > 1e-3
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


# -- LoRA-GA ----------------------------------------------------------------------------------------

def _batches(n=3, seed=0):
    g = _gen(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_estimated_gradient_is_autograd_on_the_plain_model():
    torch.manual_seed(0)
    base = tiny_vit()
    model = apply_glora(copy.deepcopy(base), LARGE_SPACE)
    for i, (_, layer) in enumerate(glora_layers(model)):  # adapters that would change G were they left on
        _offset_init(layer, _gen(i))
        _step(layer, _gen(i + 50), 0.1)
    set_subnet(model, uniform_subnet(model, {"A": "lora8", "B": "vector", "C": "lora4", "D": "vector", "E": "scalar"}))
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    active = [layer.active for _, layer in glora_layers(model)]
    batches = _batches()
    G = estimate_weight_grads(model, batches, _ce)
    # restored: flags, choices, modes, no stray gradients
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [layer.active for _, layer in glora_layers(model)] == active
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    # direct: the plain timm model, eval mode, every nn.Linear weight
    base.eval()
    want = {}
    for x, y in batches:
        base.zero_grad()
        F.cross_entropy(base(x), y).backward()
        for name, _ in glora_layers(model):
            g = base.get_submodule(name).weight.grad / len(batches)
            want[name] = want.get(name, 0) + g
    assert set(G) == set(want) and len(G) == 8
    for name, g in G.items():
        assert g.dtype == torch.float32 and g.shape == want[name].shape
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-7, msg=name)
    doubled = estimate_weight_grads(model, batches, _ce, reduce=lambda t: t.mul_(2))
    torch.testing.assert_close(doubled["blocks.0.attn.qkv"], 2 * G["blocks.0.attn.qkv"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no batches"):
        estimate_weight_grads(model, [], _ce)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_lora_ga_on_a_supernet_nests_and_starts_at_base():
    """A supernet tensor with ranks 8 and 4 uses ArBr: its leading rank-4 slice is the rank-4 LoRA-GA
    init; B from G, A from W0 ⊙ G, C untouched; every sub-network starts where it was."""
    torch.manual_seed(0)
    model = apply_glora(tiny_vit(), LARGE_SPACE, lora_scaling=LoraScaling(16.0)).eval()
    x = torch.randn(2, 3, 32, 32, generator=_gen(0))
    G = estimate_weight_grads(model, _batches(), _ce)
    configs = [uniform_subnet(model, {"A": a, "B": b, "C": "lora8", "D": "vector", "E": "none"})
               for a, b in [("lora8", "lora4"), ("lora4", "lora8"), ("vector", "lora4"), ("none", "scalar"), ("scalar", "vector")]]
    before = []
    for cfg in configs:
        set_subnet(model, cfg)
        before.append(model(x))
    Cu = {name: layer.glora_Cu.clone() for name, layer in glora_layers(model)}
    report = init_lora_ga(model, G, niter=None)
    assert str(report) == "LoRA-GA init (offset form): A on 8 layers, B on 8 layers; C keeps LoRA's init"
    for cfg, want in zip(configs, before):
        set_subnet(model, cfg)
        assert torch.equal(model(x), want), cfg
    for name, layer in glora_layers(model):
        assert layer.lora_init == {"A": "lora_ga", "B": "lora_ga"} and torch.equal(layer.glora_Cu, Cu[name])
        assert lora_ga_direction(layer, "B") == "ArBr"
        W0 = layer.weight.detach()
        for t, target in (("B", G[name]), ("A", W0 * G[name])):
            d, u = getattr(layer, f"glora_{t}d"), getattr(layer, f"glora_{t}u")
            d8, u8 = lora_ga_factors(target, 8, niter=None, direction="ArBr")
            d4, u4 = lora_ga_factors(target, 4, niter=None, direction="ArBr")
            assert torch.equal(d, d8) and torch.equal(u, u8), (name, t)
            assert torch.equal(d[:, :4], d4) and torch.equal(u[:4], u4), (name, t)  # nested: the slice is the rank-4 init


def test_lora_ga_on_the_lora_preset_uses_arb2r_and_merges():
    torch.manual_seed(0)
    base = tiny_vit().eval()
    lora = methods.get("lora")
    model = lora.apply(copy.deepcopy(base), lora.settings(size=2), load_space(LARGE_SPACE)).eval()
    x = torch.randn(2, 3, 32, 32, generator=_gen(0))
    G = estimate_weight_grads(model, _batches(), _ce)
    init_lora_ga(model, G, niter=None)
    assert torch.equal(model(x), base(x))
    for name, layer in glora_layers(model):
        assert lora_ga_direction(layer, "B") == "ArB2r"
        d, u = lora_ga_factors(G[name], 2, niter=None)  # the authors' defaults
        assert torch.equal(layer.glora_Bd, d) and torch.equal(layer.glora_Bu, u)
    _step(model, _gen(3), 0.05)
    y = model(x)
    assert (y - base(x)).abs().max() > 1e-3
    torch.testing.assert_close(merge_glora(copy.deepcopy(model))(x), y, rtol=0, atol=1e-5)


def test_lora_ga_errors():
    model = apply_glora(tiny_vit(), LARGE_SPACE)
    G = estimate_weight_grads(model, _batches(1), _ce)
    with pytest.raises(ValueError, match="scale: expected 'stable' or 'gd'"):
        init_lora_ga(model, G, scale="big")
    with pytest.raises(ValueError, match="direction: expected one of"):
        init_lora_ga(model, G, direction="AB")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: no estimated gradient"):
        init_lora_ga(model, {})
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: gradient has shape \(2, 2\)"):
        init_lora_ga(model, {**G, "blocks.0.attn.qkv": torch.zeros(2, 2)})
    narrow = apply_glora(nn.Sequential(nn.Linear(8, 6)), {"targets": "all-linear", "choices": {**LORA_ONLY, "B": ["lora4"]}},
                         modules_to_save=None)
    with pytest.raises(ValueError, match=r"^0: LoRA-GA on B: r=4: LoRA-GA needs 8 singular vectors"):
        init_lora_ga(narrow, {"0": torch.randn(6, 8)})
    assert not any(layer.lora_init for _, layer in glora_layers(narrow))


def test_conv_model_pissa_and_lora_ga_start_exactly_and_gradient_is_autograd():
    net = _conv_net()
    space = {"targets": "all-conv", "choices": {**CHOICES, "A": ["lora2", "vector"], "B": ["lora2", "vector"]}}
    model = apply_glora(copy.deepcopy(net), space, modules_to_save=None).eval()
    g = _gen(0)
    batches = [(torch.randn(3, 3, 6, 6, generator=g), torch.randint(0, 6, (3,), generator=g)) for _ in range(2)]
    x = batches[0][0]
    configs = [uniform_subnet(model, {"A": a, "B": b, "C": "lora4", "D": "none", "E": "scalar"})
               for a, b in [("vector", "lora2"), ("lora2", "lora2"), ("vector", "vector")]]
    before = []
    for cfg in configs:
        set_subnet(model, cfg)
        before.append(model(x))
    G = estimate_weight_grads(model, batches, _ce)
    want = {}
    for xb, yb in batches:
        net.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        for name in G:
            w = net.get_submodule(name).weight
            want[name] = want.get(name, 0) + w.grad.reshape(w.shape[0], -1) / len(batches)
    for name in G:
        torch.testing.assert_close(G[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    for init in (lambda: init_pissa(model), lambda: init_lora_ga(model, G, niter=None)):
        init()
        for cfg, y in zip(configs, before):
            set_subnet(model, cfg)
            torch.testing.assert_close(model(x), y, rtol=0, atol=0, msg=str(cfg))
    layer = model[0]
    assert layer.lora_init == {"A": "lora_ga", "B": "lora_ga"}
    _step(model, _gen(1), 0.05)
    y = model(x)
    torch.testing.assert_close(merge_glora(copy.deepcopy(model))(x), y, rtol=0, atol=1e-5)


# -- extraction and files ---------------------------------------------------------------------------

def test_extract_and_files_keep_the_function(tmp_path):
    torch.manual_seed(0)
    base = tiny_vit()
    model = apply_glora(copy.deepcopy(base), LARGE_SPACE, lora_scaling=LoraScaling(8.0)).eval()
    init_pissa(model)
    G = estimate_weight_grads(model, _batches(1), _ce)
    init_lora_ga(model, {n: g for n, g in G.items()}, niter=None)  # B again, now LoRA-GA's; A too
    _step(model, _gen(1), 0.05)
    names = [n for n, _ in glora_layers(model)]
    choices = [{"A": "lora4", "B": "lora8", "C": "lora8", "D": "vector", "E": "scalar"},
               {"A": "vector", "B": "lora4", "C": "vector", "D": "none", "E": "vector"},
               {"A": "none", "B": "vector", "C": "none", "D": "scalar", "E": "none"},
               {"A": "scalar", "B": "scalar", "C": "none", "D": "vector", "E": "vector"}]
    cfg = {n: choices[i % len(choices)] for i, n in enumerate(names)}
    set_subnet(model, cfg)
    x = torch.randn(2, 3, 32, 32, generator=_gen(0))
    y = model(x)
    # the supernet's file, onto a fresh base model and onto a GLoRA model holding other offsets
    save_adapter(model, tmp_path / "super.safetensors")
    doc = yaml.safe_load((tmp_path / "super.yaml").read_text())
    assert all(rec["lora_init"] == {"A": "lora_ga", "B": "lora_ga"} for rec in doc["layers"].values())
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "super.safetensors").eval()
    assert torch.equal(loaded(x), y)
    other = apply_glora(copy.deepcopy(base), LARGE_SPACE, lora_scaling=LoraScaling(8.0)).eval()
    for _, layer in glora_layers(other):
        _offset_init(layer, _gen(7), "C")
    loaded = load_adapter(other, tmp_path / "super.safetensors")
    assert all(layer.lora_init == {"A": "lora_ga", "B": "lora_ga"} for _, layer in glora_layers(loaded))
    assert not any(n.endswith("glora_Cd0") for n in loaded.state_dict()) and torch.equal(loaded(x), y)
    # extraction: low-rank offsets sliced, vector and scalar ones folded into the column
    extract_subnet(model)
    small = dict(glora_layers(model))
    assert torch.equal(model(x), y)
    first = small[names[0]]
    assert first.lora_init == {"A": "lora_ga", "B": "lora_ga"} and first.glora_Ad0.shape == (first.rows, 4)
    assert first.glora_Bu0.shape == (8, first.cols)
    assert small[names[1]].lora_init == {"B": "lora_ga"} and small[names[2]].lora_init == {}
    torch.testing.assert_close(merge_glora(copy.deepcopy(model))(x), y, rtol=0, atol=1e-5)
    save_adapter(model, tmp_path / "small.safetensors")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "small.safetensors").eval()
    assert torch.equal(loaded(x), y)
    # a record naming an init for a tensor without a low-rank choice is refused, in one line
    doc = yaml.safe_load((tmp_path / "small.yaml").read_text())
    doc["layers"][names[2]]["lora_init"] = {"B": "pissa"}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(AdapterError, match=rf"layer {names[2]}: bad lora_init \(lora init of B: no low-rank choice"):
        load_adapter(copy.deepcopy(base), tmp_path / "small.safetensors")


@pytest.mark.parametrize("kind", ["pissa", "lora_ga"])
def test_a_layer_too_narrow_for_the_init_keeps_loras_and_the_report_says_so(kind):
    """EfficientNet's depthwise 3x3 kernels are (C, 9) matrices: 9 singular vectors, fewer than
    LoRA-GA needs at rank 8. Such a layer keeps LoRA's init; the others take the data-aware one."""
    torch.manual_seed(0)
    space = {"targets": "all-linear", "choices": {**LORA_ONLY, "B": ["lora8"]}}
    model = apply_glora(nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 6 if kind == "lora_ga" else 5)), space,
                        modules_to_save=None).eval()
    x, y = torch.randn(8, 20, generator=_gen(1)), torch.randint(0, 5, (8,), generator=_gen(2))
    before = model(x)
    narrow = dict(glora_layers(model))["2"]
    factors = (narrow.glora_Bd.clone(), narrow.glora_Bu.clone())
    if kind == "pissa":
        report = init_pissa(model)
    else:
        G = estimate_weight_grads(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]))
        report = init_lora_ga(model, G, niter=None)
    name = {"pissa": "PiSSA", "lora_ga": "LoRA-GA"}[kind]
    assert str(report) == f"{name} init (offset form): B on 1 layer; LoRA's init where too few singular vectors for the rank: B on 1 layer"
    assert report.layers == {"0": ("B",)} and report.too_small == {"2": ("B",)}
    assert dict(glora_layers(model))["0"].lora_init == {"B": kind}
    assert torch.equal(narrow.glora_Bd, factors[0]) and torch.equal(narrow.glora_Bu, factors[1])
    assert torch.equal(model(x), before)  # offset form: nothing moves until it trains
