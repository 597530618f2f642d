"""DoRA on GLoRA's layers (docs/lora-family.md "DoRA"): ``W' = m ⊙ V / ‖V‖`` with ``V = W0 + W0 ⊙ A + B``
of the active choice, row norms detached in backward, the bias not rescaled. Forward, gradients and
merge against the dense formula (linear and convolution, with and without LoRA's scale), PEFT's DoRA
as an oracle, the exact start at the base model, set_dora's rules, counts, files, extraction and the
supernet's sampler."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import yaml

from conftest import LARGE_SPACE, assert_same_grads, tiny_vit
from search.budget import ChoiceGrid
from supernet import (TENSORS, GLoraConv2d, GLoraLinear, LayerChoice, LoraScaling, SpaceError, SubnetSampler, apply_glora,
                      choice_costs, count_params, dora_layers, extract_subnet, get_subnet, glora_layers, layer_choices,
                      load_adapter, load_space, merge_glora, sample_subnet, save_adapter, set_dora, set_subnet, subnet_to_dict)
from supernet.dora import row_norms
from test_conv import GEOMETRIES, _dense_weight_bias, _reference, _with_bias
from test_lora_scaling import _scaled
from test_supernet_layer import _expected_support

F64 = torch.float64
# every kind of A and B (lora at two ranks: lora2 is a slice of the rank-4 tensors), with C, D, E
CHOICES = {"A": ["lora2", "lora4", "vector", "scalar", "none"], "B": ["lora2", "lora4", "vector", "scalar", "none"],
           "C": ["lora4", "vector", "none"], "D": ["vector", "scalar", "none"], "E": ["vector", "scalar", "none"]}
SCALINGS = [None, LoraScaling(16.0), LoraScaling(6.0, use_rslora=True)]
SCALING_IDS = ["s1", "alpha16", "alpha6-rslora"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _combos(layer):
    """Every (A, B) pair, each with C, D, E cycling through their own choices (as many as the layer allows)."""
    cde = list(itertools.product(*(layer.choices[t] for t in "CDE")))
    for k, (a, b) in enumerate(itertools.product(layer.choices["A"], layer.choices["B"])):
        yield LayerChoice(a, b, *cde[k % len(cde)])


def _dora(V, m):
    """DoRA written out: each row of V divided by its norm (a constant: no gradient through it) and times m."""
    flat = V.reshape(V.shape[0], -1)
    return (m[:, None] * flat / flat.detach().norm(dim=1, keepdim=True)).view_as(V)


def _randomise(layer, gen):
    """Random adapters, and a magnitude away from V's norms (so m / ‖V‖ is not 1)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "glora_m":
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=gen, dtype=p.dtype))
            elif name.startswith("glora_"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def _adapter_grads_args(layer):
    named = [(n, p) for n, p in layer.named_parameters() if n.startswith("glora_")]
    assert "glora_m" in [n for n, _ in named]
    return [p for _, p in named], [n for n, _ in named]


# -- the formula ------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", SCALINGS, ids=SCALING_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_matches_dense_formula(scaling, bias):
    """float64: output, merged weight (and its out= form) and the gradients of x, of every shared
    adapter tensor and of m equal ``F.linear(x, dora(W0 + W0 ⊙ A + B, m), b0 + b0 ⊙ D + E + W0 C)``
    with A..E written out from the raw parameters (LoRA's scale on the lora choices)."""
    torch.manual_seed(0)
    base = nn.Linear(7, 5, bias=bias).double()
    layer = GLoraLinear(base, CHOICES, lora_scaling=scaling)
    layer.set_dora(True)
    gen = torch.Generator().manual_seed(3)
    _randomise(layer, gen)
    W0 = base.weight
    b0 = base.bias if bias else torch.zeros(5, dtype=F64)
    params, names = _adapter_grads_args(layer)
    x = torch.randn(3, 4, 7, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(3, 4, 5, generator=gen, dtype=F64)
    plain_W = nn.Linear(7, 5).double().requires_grad_(False)
    n = 0
    for c in _combos(layer):
        layer.set_choice(c)
        A, B, C, D, E = _expected_support(layer, c) if scaling is None else _scaled(_expected_support(layer, c), c, scaling)
        W = _dora(W0 + W0 * A + B, layer.glora_m)
        b = b0 + b0 * D + E + (W0 @ C).squeeze(-1)
        want = x @ W.T + b
        y = layer(x)
        assert (y - want).abs().max().item() <= 1e-10, str(c)
        Wm, bm = layer.merged_weight_bias()
        bm = torch.zeros(5, dtype=F64) if bm is None else bm
        assert (Wm - W).abs().max().item() <= 1e-10 and (bm - b).abs().max().item() <= 1e-10, str(c)
        layer.merged_weight_bias(out=(plain_W.weight, plain_W.bias))  # the search's in-place merge
        assert (plain_W(x) - want).abs().max().item() <= 1e-10, str(c)
        assert_same_grads(y, want, w, [x, *params], ["x"] + names, str(c))
        n += 1
    assert n == 25


@pytest.mark.parametrize("scaling", [None, LoraScaling(16.0)], ids=["s1", "alpha16"])
@pytest.mark.parametrize("build,size", [g[1:] for g in GEOMETRIES], ids=[g[0] for g in GEOMETRIES])
def test_conv_matches_dense_formula(build, size, scaling):
    """float64, every convolution geometry (grouped, depthwise, dynamic 'SAME' padding): DoRA normalises
    each output channel's kernel, the (out, in/groups·kh·kw) row; output, merge and every gradient."""
    torch.manual_seed(0)
    base = build(True).double()
    layer = GLoraConv2d(copy.deepcopy(base), load_space(LARGE_SPACE).choices, lora_scaling=scaling)
    layer.set_dora(True)
    gen = torch.Generator().manual_seed(1)
    _randomise(layer, gen)
    params, names = _adapter_grads_args(layer)
    x = torch.randn(2, base.in_channels, size, size + 1, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(base(x).shape, generator=gen, dtype=F64)
    ref = _with_bias(base)
    for c in _combos(layer):
        layer.set_choice(c)
        V, b = _dense_weight_bias(base, layer.support_tensors())  # support_tensors carries LoRA's scale
        W = _dora(V, layer.glora_m)
        want = _reference(ref, W, b, x)
        y = layer(x)
        assert y.shape == want.shape and (y - want).abs().max().item() <= 1e-10, str(c)
        assert (row_norms(W) - layer.glora_m).abs().max().item() <= 1e-10  # each kernel has norm m
        Wm, bm = layer.merged_weight_bias()
        assert (Wm - W).abs().max().item() <= 1e-10 and (bm - b).abs().max().item() <= 1e-10, str(c)
        assert_same_grads(y, want, w, [x, *params], ["x"] + names, str(c))


def test_norm_is_detached():
    """The gradient of Bd is (m/‖V‖) ⊙ ∂L/∂W' carried back, with no term through ‖V‖: the un-detached
    formula gives another gradient (so the test above can tell them apart)."""
    torch.manual_seed(0)
    layer = GLoraLinear(nn.Linear(6, 4).double(), {"A": ["none"], "B": ["lora2"], "C": ["none"], "D": ["none"], "E": ["none"]})
    layer.set_dora(True)
    _randomise(layer, torch.Generator().manual_seed(0))
    x = torch.randn(5, 6, dtype=F64)
    g_ours = torch.autograd.grad(layer(x).square().sum(), layer.glora_Bd)[0]
    V = layer.weight + layer.glora_Bd @ layer.glora_Bu
    attached = layer.glora_m[:, None] * V / V.norm(dim=1, keepdim=True)
    g_attached = torch.autograd.grad((x @ attached.T + layer.bias).square().sum(), layer.glora_Bd)[0]
    assert (g_ours - g_attached).abs().max().item() > 1e-3


# -- PEFT as the oracle -----------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_lora_choice_matches_peft_dora(use_rslora):
    """PEFT's ``LoraConfig(r, lora_alpha, use_dora=True)`` Linear against a GLoRA layer with B lora_r
    (Bd = PEFT's lora_B, Bu = PEFT's lora_A, scale α/r or α/√r via LoraScaling) and DoRA: forward and
    the gradients of x, m and both factors in float64."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    r, alpha = 3, 5.0
    base = nn.Sequential(nn.Linear(9, 7)).double()
    ours = GLoraLinear(copy.deepcopy(base[0]), {"A": ["none"], "B": [f"lora{r}"], "C": ["none"], "D": ["none"], "E": ["none"]},
                       lora_scaling=LoraScaling(alpha, use_rslora=use_rslora))
    ours.set_dora(True)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=r, lora_alpha=alpha, use_dora=True, use_rslora=use_rslora, target_modules=["0"]), base).double()[0]
    lora_A, lora_B = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    mag = theirs.lora_magnitude_vector["default"].weight
    # both start at W0's row norms
    assert (mag.detach() - ours.glora_m.detach()).abs().max().item() <= 1e-12
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from lora_B = 0 and from the initial magnitude
        lora_B.copy_(torch.randn(lora_B.shape, generator=gen, dtype=F64) * 0.3)
        lora_A.copy_(torch.randn(lora_A.shape, generator=gen, dtype=F64) * 0.3)
        mag.mul_(1 + 0.3 * torch.rand(mag.shape, generator=gen, dtype=F64))
        ours.glora_Bd.copy_(lora_B)
        ours.glora_Bu.copy_(lora_A)
        ours.glora_m.copy_(mag)
    x = torch.randn(4, 6, 9, generator=gen, dtype=F64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_theirs, y_ours = theirs(x1), ours(x2)
    assert (y_ours - y_theirs).abs().max().item() <= 1e-10
    up = torch.randn(y_ours.shape, generator=gen, dtype=F64)
    g_theirs = torch.autograd.grad(y_theirs, [x1, mag, lora_B, lora_A], up)
    g_ours = torch.autograd.grad(y_ours, [x2, ours.glora_m, ours.glora_Bd, ours.glora_Bu], up)
    for name, a, b in zip(("x", "m", "Bd/lora_B", "Bu/lora_A"), g_ours, g_theirs):
        assert (a - b).abs().max().item() <= 1e-10, name
    W, _ = ours.merged_weight_bias()
    assert (nn.functional.linear(x, W, ours.bias) - y_theirs).abs().max().item() <= 1e-10


# -- starting point and set_dora's rules ------------------------------------------------------
def test_model_starts_exactly_at_base():
    """m is W0's row norms by the forward's own norm op, so m / ‖W0‖ is exactly 1 and the output is
    bit for bit the base model's (a ViT in the large space, and with LoRA's scale)."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = tiny_vit().eval()
    with torch.no_grad():
        want = model(x)
    for scaling in (None, LoraScaling(16.0)):
        adapted = apply_glora(copy.deepcopy(model), LARGE_SPACE, lora_scaling=scaling, use_dora=True)
        layers = dict(glora_layers(adapted))
        assert dora_layers(adapted) == list(layers)
        for layer in layers.values():
            assert torch.equal(layer.glora_m / row_norms(layer.weight), torch.ones_like(layer.glora_m))
            assert layer.glora_m.requires_grad
        with torch.no_grad():
            assert torch.equal(adapted(x), want)


@pytest.mark.parametrize("build,size", [g[1:] for g in GEOMETRIES], ids=[g[0] for g in GEOMETRIES])
def test_conv_starts_at_base(build, size):
    torch.manual_seed(0)
    base = build(True)
    layer = GLoraConv2d(copy.deepcopy(base), load_space(LARGE_SPACE).choices)
    layer.set_dora(True)
    x = torch.randn(2, base.in_channels, size, size)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
        assert torch.equal(layer.merged_weight_bias()[0], base.weight)


def test_set_dora_keeps_the_function_of_a_trained_layer():
    """On a layer whose V is not W0 (a retrained or extracted sub-network), m starts at V's norms:
    the output is unchanged; enabling again is a no-op; disabling is refused in one line."""
    torch.manual_seed(0)
    layer = GLoraLinear(nn.Linear(7, 5).double(), CHOICES, lora_scaling=LoraScaling(8.0))
    _randomise(layer, torch.Generator().manual_seed(2))
    layer.set_choice(LayerChoice.parse({"A": "lora4", "B": "vector", "C": "vector", "D": "scalar", "E": "vector"}))
    x = torch.randn(3, 7, dtype=F64)
    before = layer(x)
    assert "glora_m" not in layer.state_dict() and not layer.use_dora
    layer.set_dora(True)
    m = layer.glora_m
    assert (layer(x) - before).abs().max().item() <= 1e-12
    assert (row_norms(layer.weight) - m).abs().max().item() > 1e-3  # V's norms, not W0's
    layer.set_dora(True)
    assert layer.glora_m is m
    with pytest.raises(SpaceError) as err:
        layer.set_dora(False)
    assert "\n" not in str(err.value) and "DoRA" in str(err.value)
    with pytest.raises(SpaceError, match="use_dora"):
        layer.set_dora("yes")
    assert "dora" in repr(layer)


def test_model_level_set_dora():
    torch.manual_seed(0)
    model = apply_glora(tiny_vit(), LARGE_SPACE)
    set_dora(model, False)  # nothing to turn off: a no-op
    assert dora_layers(model) == [] and not any(k.endswith("glora_m") for k in model.state_dict())
    set_dora(model, True)
    assert dora_layers(model) == [n for n, _ in glora_layers(model)]
    with pytest.raises(SpaceError, match="cannot be turned off"):
        set_dora(model, False)
    assert len(dora_layers(model)) == len(list(glora_layers(model)))
    with pytest.raises(SpaceError, match="use_dora"):
        apply_glora(tiny_vit(), LARGE_SPACE, use_dora=1)


def test_default_layer_is_unchanged():
    """Without DoRA no glora_m exists: the state dict and the saved record are what they always were."""
    torch.manual_seed(0)
    model = apply_glora(tiny_vit(), LARGE_SPACE)
    assert not any("glora_m" in k for k in model.state_dict())
    assert all(not layer.use_dora and "use_dora" not in layer.__dict__ for _, layer in glora_layers(model))
    from supernet.io import _layer_record

    assert all("use_dora" not in _layer_record(layer) for _, layer in glora_layers(model))


# -- counts -----------------------------------------------------------------------------------
def test_counts_include_the_magnitude():
    """A DoRA layer holds ``rows`` parameters more whatever its choice: count_params, layer.cost and the
    search's sum over choice_costs (the grid search.py builds) all add them."""
    torch.manual_seed(0)
    plain = apply_glora(tiny_vit(), LARGE_SPACE)
    dora = apply_glora(tiny_vit(), LARGE_SPACE, use_dora=True)
    rows = sum(layer.rows for _, layer in glora_layers(dora))
    gen = torch.Generator().manual_seed(0)
    names = {n: {t: [str(c) for c in cs] for t, cs in per.items()} for n, per in layer_choices(dora).items()}
    grid, grid0 = ChoiceGrid(names, choice_costs(dora)), ChoiceGrid(names, choice_costs(plain))
    assert grid.min_total == grid0.min_total + rows and grid.max_total == grid0.max_total + rows
    for _ in range(5):
        config = sample_subnet(dora, gen)
        assert count_params(dora, config).adapter == count_params(plain, config).adapter + rows
        assert grid.cost(grid.encode(subnet_to_dict(config))) == count_params(dora, config).adapter
        assert grid0.cost(grid0.encode(subnet_to_dict(config))) == count_params(plain, config).adapter
    none = {n: LayerChoice.parse({t: "none" for t in TENSORS}) for n, _ in glora_layers(dora)}
    assert count_params(dora, none).adapter == rows
    small = extract_subnet(dora, none)
    assert sum(p.numel() for _, layer in glora_layers(small) for p in layer.adapter_parameters()) == rows


# -- supernet, extraction, merging, files -----------------------------------------------------
def _trained_dora_vit(dtype=torch.float32):
    torch.manual_seed(0)
    model = apply_glora(tiny_vit().to(dtype), LARGE_SPACE, lora_scaling=LoraScaling(4.0), use_dora=True).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("glora_m"):
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen, dtype=p.dtype))
            elif "glora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    return model


def test_sampler_trains_the_magnitude_and_merges_exactly():
    """The supernet's sampler activates DoRA layers like any other; every draw trains m, and merges
    (merge_glora, float64) to the same outputs to 1e-10, which differ from the merge without DoRA."""
    model = _trained_dora_vit(F64)
    sampler = SubnetSampler(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    gen, ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(3):
        config = sampler(gen)
        assert config == sample_subnet(copy.deepcopy(model), ref, activate=False)
        assert get_subnet(model) == config
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        for _, layer in glora_layers(model):
            assert layer.glora_m.grad is not None and layer.glora_m.grad.abs().sum() > 0
        with torch.no_grad():
            merged = merge_glora(copy.deepcopy(model))
            assert (merged(x) - y).abs().max().item() <= 1e-10
            undora = copy.deepcopy(model)
            for _, layer in glora_layers(undora):
                object.__setattr__(layer, "use_dora", False)
            assert (merge_glora(undora)(x) - y).abs().max().item() > 1e-4


def test_extract_save_load_round_trip(tmp_path):
    """extract_subnet keeps DoRA and m (output and count unchanged); save_adapter records use_dora and
    load_adapter rebuilds it on a fresh model, on a GLoRA model without DoRA, and from a supernet file."""
    model = _trained_dora_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    config = sample_subnet(model, torch.Generator().manual_seed(3))
    # the supernet file round trip: same layers, same magnitudes, same output of the sub-network
    save_adapter(model, tmp_path / "supernet.safetensors")
    doc = yaml.safe_load((tmp_path / "supernet.yaml").read_text())
    assert all(rec["use_dora"] is True for rec in doc["layers"].values())
    torch.manual_seed(0)
    fresh = load_adapter(tiny_vit().eval(), tmp_path / "supernet.safetensors")
    set_subnet(fresh, config)
    assert dora_layers(fresh) == dora_layers(model)
    with torch.no_grad():
        y = model(x)
        assert torch.equal(fresh(x), y)
    count = count_params(model)
    small = extract_subnet(model)
    assert dora_layers(small) == [n for n, _ in glora_layers(small)] and count_params(small) == count
    with torch.no_grad():
        assert (small(x) - y).abs().max().item() <= 1e-6
    save_adapter(small, tmp_path / "adapter.safetensors")
    def base():  # the backbone the adapters were trained on (the files hold no backbone weights)
        torch.manual_seed(0)
        return tiny_vit().eval()

    # a fresh model, and the same sub-network's GLoRA layers without DoRA (they gain it and the file's m)
    for target in (base(), extract_subnet(apply_glora(base(), LARGE_SPACE), config)):
        loaded = load_adapter(target, tmp_path / "adapter.safetensors")
        assert dora_layers(loaded) == dora_layers(small)
        with torch.no_grad():
            assert torch.equal(loaded(x), small(x))
        assert get_subnet(loaded) == config  # the file's sub-network is active
    # a file without DoRA does not fit a model whose layers have it (m cannot be dropped)
    plain = apply_glora(tiny_vit(), LARGE_SPACE)
    save_adapter(plain, tmp_path / "plain.safetensors")
    assert "use_dora" not in yaml.safe_load((tmp_path / "plain.yaml").read_text())["layers"]["blocks.0.attn.qkv"]
    with pytest.raises(ValueError, match="uses DoRA and the file's does not"):
        load_adapter(apply_glora(tiny_vit(), LARGE_SPACE, use_dora=True), tmp_path / "plain.safetensors")
    # a bad use_dora value is refused naming the layer
    doc = yaml.safe_load((tmp_path / "adapter.yaml").read_text())
    doc["layers"]["blocks.0.attn.qkv"]["use_dora"] = "yes"
    (tmp_path / "adapter.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="blocks.0.attn.qkv: use_dora: must be true or false"):
        load_adapter(tiny_vit(), tmp_path / "adapter.safetensors")


def test_bf16_autocast_is_finite_and_close():
    """Under CPU bf16 autocast V and its norm are built in the adapters' fp32; the products run in bf16."""
    model = _trained_dora_vit()
    sample_subnet(model, torch.Generator().manual_seed(2))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max().item() <= 0.05 * max(1.0, want.abs().max().item())


def test_with_vector_params():
    """LoRA+'s layers (vector_params: vector/scalar choices in their own glora_Xv) take DoRA too: V is
    built from the parameter each choice lives in, merges exactly and survives extraction."""
    torch.manual_seed(0)
    model = apply_glora(tiny_vit().double(), LARGE_SPACE, vector_params=True, use_dora=True).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "glora_" in name and not name.endswith("glora_m"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=F64)
    config = {n: LayerChoice.parse({"A": "vector", "B": "scalar", "C": "vector", "D": "vector", "E": "scalar"})
              for n, _ in glora_layers(model)}
    set_subnet(model, config)
    with torch.no_grad():
        y = model(x)
        assert (merge_glora(copy.deepcopy(model))(x) - y).abs().max().item() <= 1e-10
        assert (extract_subnet(model)(x) - y).abs().max().item() <= 1e-10


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "depthwise-conv"])
def test_a_zero_row_of_w0_stays_finite_trains_and_merges(conv):
    """Pretrained weights have all-zero rows (EfficientNet-Lite0's dead depthwise channels): ‖W0_i‖ = 0
    and m_i = 0 made m / ‖V‖ a 0/0 and the whole model NaN at step 0. Such a row outputs zero, the
    other rows are DoRA exactly, a step keeps everything finite, and the merge agrees."""
    torch.manual_seed(0)
    base = nn.Conv2d(4, 4, 3, padding=1, groups=4) if conv else nn.Linear(6, 4)
    with torch.no_grad():
        base.weight[1].zero_()
    layer = (GLoraConv2d if conv else GLoraLinear)(copy.deepcopy(base), load_space(LARGE_SPACE).choices)
    layer.set_dora(True)
    layer.set_choice(dict(A="lora4", B="lora4", C="none", D="none", E="none"))
    x = torch.randn(3, 4, 5, 5) if conv else torch.randn(3, 6)
    y = layer(x)
    assert layer.glora_m[1] == 0 and row_norms(layer.weight)[1] == 0
    torch.testing.assert_close(y, base(x), rtol=0, atol=1e-6)
    y.square().sum().backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    _randomise(layer, torch.Generator().manual_seed(3))
    y = layer(x)
    assert torch.isfinite(y).all()
    with torch.no_grad():
        W, b = layer.merged_weight_bias()
        merged = copy.deepcopy(base)
        merged.weight.copy_(W)
        merged.bias.copy_(b)
        torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
