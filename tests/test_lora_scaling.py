"""LoRA's scale s on the low-rank GLoRA tensors (docs/lora-family.md): s = lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora, r the active rank; forward, hand-written backward, merge, the
conv layer, files, the run config, and PEFT's LoRA as an oracle."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
import yaml

from conftest import assert_same_grads
from engine import distributed as dist
from engine.config import ConfigError, LoraOptions, config_from_dict, load_config
from engine.recipes.retrain import run_retrain
from engine.rundir import relevant_config
from methods.lorafamily import lora_scale
from runcfg import tiny_config, write_config
from supernet import (TENSORS, GLoraConv2d, GLoraLinear, LayerChoice, LoraScaling, SpaceError, apply_glora, extract_subnet,
                      glora_layers, load_adapter, load_space, merge_glora, save_adapter, set_lora_scaling, set_subnet, uniform_subnet)
from supernet.kernels import _plan_for
from test_conv import GEOMETRIES, _dense_weight_bias, _reference, _with_bias
from test_supernet_layer import _dense_output, _expected_support, _randomise

CHOICES = {"A": ["lora2", "lora4", "vector", "none"], "B": ["lora2", "lora4", "scalar"],
           "C": ["lora2", "lora4", "vector", "none"], "D": ["vector", "none"], "E": ["scalar"]}
SCALINGS = [LoraScaling(16.0), LoraScaling(16.0, use_rslora=True), LoraScaling(3.0)]
IDS = ["alpha16", "alpha16-rslora", "alpha3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _s(scaling: LoraScaling, c) -> float:
    """The scale the docs give, written out: 1 for every choice but lora_r."""
    if c.kind != "lora":
        return 1.0
    return scaling.lora_alpha / (math.sqrt(c.rank) if scaling.use_rslora else c.rank)


def _scaled(support, c: LayerChoice, scaling: LoraScaling):
    A, B, C, D, E = support
    return A * _s(scaling, c.A), B * _s(scaling, c.B), C * _s(scaling, c.C), D, E


def test_scale_is_lora_scale():
    for scaling in SCALINGS:
        for r in (1, 2, 4, 8, 64):
            assert scaling.scale(r) == lora_scale(scaling.lora_alpha, r, scaling.use_rslora)


@pytest.mark.parametrize("scaling", SCALINGS, ids=IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_matches_dense_formula_with_scale(scaling, bias):
    """float64: support tensors, output, merge (and out=) and every gradient equal the dense formula
    with s·(down@up) for each low-rank choice (slices of rank-4 shared tensors: lora2 uses r = 2)."""
    torch.manual_seed(0)
    base = nn.Linear(7, 5, bias=bias).double()
    layer = GLoraLinear(base, CHOICES, lora_scaling=scaling)
    gen = torch.Generator().manual_seed(3)
    _randomise(layer, gen)
    W0, b0 = base.weight, base.bias if bias else torch.zeros(5, dtype=torch.float64)
    params = layer.adapter_parameters()
    names = [n for n, _ in layer.named_parameters() if n.startswith("glora_")]
    x = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    combos = list(itertools.product(*(layer.choices[t] for t in TENSORS)))
    for combo in combos:
        c = LayerChoice(*combo)
        layer.set_choice(c)
        want_support = _scaled(_expected_support(layer, c), c, scaling)
        for got, want in zip(layer.support_tensors(), want_support):
            torch.testing.assert_close(got.expand_as(want), want, atol=1e-12, rtol=0)
        want = _dense_output(x, W0, b0, *want_support)
        y = layer(x)
        assert (y - want).abs().max().item() <= 1e-10, str(c)
        Wm, bm = layer.merged_weight_bias()
        assert ((x @ Wm.T + (0 if bm is None else bm)) - want).abs().max().item() <= 1e-10, str(c)
        out = (torch.full((5, 7), float("nan"), dtype=torch.float64), torch.full((5,), float("nan"), dtype=torch.float64))
        layer.merged_weight_bias(out=out)
        assert torch.equal(out[0], Wm) and torch.equal(out[1], torch.zeros(5, dtype=torch.float64) if bm is None else bm)
        assert_same_grads(y, want, w, [x, *params], ["x"] + names, str(c))
    # the scale changes something: the unscaled layer differs wherever a low-rank tensor is active
    layer.set_choice(LayerChoice.parse({"A": "lora2", "B": "lora4", "C": "lora2", "D": "none", "E": "scalar"}))
    scaled = layer(x)
    layer.set_lora_scaling(None)
    assert (layer(x) - scaled).abs().max() > 1e-3


@pytest.mark.parametrize("scaling", SCALINGS[:2], ids=IDS[:2])
@pytest.mark.parametrize("build,size", [g[1:] for g in GEOMETRIES[:4]], ids=[g[0] for g in GEOMETRIES[:4]])
def test_conv_matches_dense_formula_with_scale(build, size, scaling):
    torch.manual_seed(0)
    base = build(True).double()
    layer = GLoraConv2d(copy.deepcopy(base), CHOICES, lora_scaling=scaling)
    gen = torch.Generator().manual_seed(1)
    _randomise(layer, gen)
    params = layer.adapter_parameters()
    names = [n for n, _ in layer.named_parameters() if n.startswith("glora_")]
    x = torch.randn(2, base.in_channels, size, size + 1, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = _with_bias(base)
    w = torch.randn(base(x).shape, generator=gen, dtype=torch.float64)
    for combo in itertools.product(*(layer.choices[t] for t in TENSORS)):
        c = LayerChoice(*combo)
        layer.set_choice(c)
        support = layer.support_tensors()
        for got, want in zip(support, _scaled(_raw_support(layer, c), c, scaling)):
            torch.testing.assert_close(got.expand_as(want), want, atol=1e-12, rtol=0)
        W, b = _dense_weight_bias(base, support)
        want = _reference(ref, W, b, x)
        y = layer(x)
        assert (y - want).abs().max().item() <= 1e-10, str(c)
        Wm, bm = layer.merged_weight_bias()
        assert (Wm - W).abs().max().item() <= 1e-12 and (bm - b).abs().max().item() <= 1e-12, str(c)
        assert_same_grads(y, want, w, [x, *params], ["x"] + names, str(c))


def _raw_support(layer, c):
    """The unscaled support tensors, from the raw shared parameters (A, B as (rows, cols) or broadcastable)."""
    def lr(t):
        ch, d, u = c[t], getattr(layer, f"glora_{t}d"), getattr(layer, f"glora_{t}u")
        if ch.kind == "lora":
            return d[:, : ch.rank] @ u[: ch.rank]
        if ch.kind == "vector":
            return d[:, :1]
        if ch.kind == "scalar":
            return d[:1, :1]
        return torch.zeros(1, 1, dtype=torch.float64) if t != "C" else torch.zeros(layer.c_rows, 1, dtype=torch.float64)

    def de(t):
        ch, p = c[t], getattr(layer, f"glora_{t}")
        return p if ch.kind == "vector" else p[:1].expand(layer.rows) if ch.kind == "scalar" else torch.zeros(layer.rows, dtype=torch.float64)

    return lr("A"), lr("B"), lr("C"), de("D"), de("E")


def test_active_rank_sets_the_scale_and_extract_keeps_it():
    """A lora2 slice of a rank-4 shared tensor uses r = 2: alpha 8 gives s = 4 there, 2 on lora4."""
    torch.manual_seed(0)
    layer = GLoraLinear(nn.Linear(6, 4).double(), {**CHOICES, "A": ["none"], "C": ["none"]}, lora_scaling=LoraScaling(8.0))
    _randomise(layer, torch.Generator().manual_seed(0))
    Bd, Bu = layer.glora_Bd.detach(), layer.glora_Bu.detach()
    for rank, s in ((2, 4.0), (4, 2.0)):
        layer.set_choice({"A": "none", "B": f"lora{rank}", "C": "none", "D": "none", "E": "scalar"})
        torch.testing.assert_close(layer.support_tensors().B, s * Bd[:, :rank] @ Bu[:rank], atol=1e-12, rtol=0)
    model = nn.Sequential(layer)
    x = torch.randn(3, 6, dtype=torch.float64)
    layer.set_choice({"A": "none", "B": "lora2", "C": "none", "D": "vector", "E": "scalar"})
    y = model(x)
    extract_subnet(model)
    small = model[0]
    assert small.lora_scaling == LoraScaling(8.0) and small.glora_Bd.shape == (4, 2)
    torch.testing.assert_close(model(x), y, atol=1e-12, rtol=0)


def _two_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("r", [4, 8])
def test_lora_method_matches_peft(r, rslora):
    """PEFT's LoRA Linear (lora_alpha=16, use_rslora) at rank r with the same factors is our lora method
    with the same alpha: PEFT's lora_A (r, in) is our up factor Bu, its lora_B (out, r) our down factor Bd."""
    peft = pytest.importorskip("peft")
    import methods

    lora = methods.get("lora")
    base = _two_layers()
    ours = copy.deepcopy(base)
    lora.apply(ours, lora.settings(size=r), load_space({"targets": "all-linear", "choices": CHOICES}),
               lora_scaling=LoraScaling(16.0, rslora))
    _randomise(ours[0], torch.Generator().manual_seed(1))
    _randomise(ours[2], torch.Generator().manual_seed(2))
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=16, use_rslora=rslora, target_modules=["0", "2"],
                                                          lora_dropout=0.0), copy.deepcopy(base)).eval()
    with torch.no_grad():
        for name, layer in glora_layers(ours):
            pl = theirs.get_submodule(name)
            assert pl.scaling["default"] == pytest.approx(16 / (math.sqrt(r) if rslora else r))
            pl.lora_A["default"].weight.copy_(layer.glora_Bu)
            pl.lora_B["default"].weight.copy_(layer.glora_Bd)
        x = torch.randn(4, 7)
        got, want = ours(x), theirs(x)
        assert (got - base(x)).abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32, outputs up to ~100
        torch.testing.assert_close(merge_glora(copy.deepcopy(ours))(x), want, rtol=1e-5, atol=1e-5)


def test_default_is_the_unscaled_path():
    """No scaling (the default): the plan is the very one the layer always had (4 arguments, no
    scales: not one multiply more), the forward equals s = alpha / r = 1, and the config's default is None."""
    torch.manual_seed(0)
    layer = GLoraLinear(nn.Linear(7, 5), CHOICES)
    _randomise(layer, torch.Generator().manual_seed(0))
    x = torch.randn(3, 7)
    for combo in [("lora2", "lora4", "lora4", "vector", "scalar"), ("vector", "lora2", "lora2", "none", "scalar")]:
        c = LayerChoice.parse(dict(zip(TENSORS, combo)))
        layer.set_choice(c)
        assert layer.lora_scaling is None and layer._plan.scales is None
        assert layer._plan is _plan_for(c, layer._param_shapes, 5, 7)
        y = layer(x)
        layer.set_lora_scaling(LoraScaling(2.0))  # s = 1 on the rank-2 tensors only
        want = tuple((k, 0.5) for t, k in zip("ABC", (0, 2, 4)) if c[t].kind == "lora" and c[t].rank == 4)
        assert layer._plan.scales == (want or None)
        layer.set_lora_scaling(None)
        assert torch.equal(layer(x), y)
    assert LoraOptions().scaling() is None
    cfg = config_from_dict(tiny_config("unused"))
    assert cfg.train.lora.scaling() is None and cfg.retrain.lora.scaling() is None
    # runs made before the key existed keep their fingerprints: the default is left out
    assert "lora" not in yaml.safe_dump(relevant_config(cfg.to_dict(), "train"))


@pytest.mark.parametrize("section", ["train", "retrain"])
def test_config_errors(tmp_path, section):
    path = write_config(tmp_path / "c.yaml", tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        load_config(path, [f"{section}.lora.use_rslora=true"])
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(f"{section}.lora.use_rslora:")
    for bad in ("0", "-2"):
        with pytest.raises(ConfigError) as err:
            load_config(path, [f"{section}.lora.lora_alpha={bad}"])
        assert err.value.problems == [f"{section}.lora.lora_alpha: must be > 0, got {float(bad)!r}"]
    with pytest.raises(ConfigError, match=rf"{section}\.lora\.lora_alfa: unknown key; did you mean 'lora_alpha'"):
        load_config(path, [f"{section}.lora.lora_alfa=8"])
    cfg = load_config(path, [f"{section}.lora.lora_alpha=16", f"{section}.lora.use_rslora=true"])
    assert getattr(cfg, section).lora.scaling() == LoraScaling(16.0, True)


def test_config_refuses_a_scale_nothing_takes(tmp_path):
    path = write_config(tmp_path / "c.yaml", tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["retrain.preset=adapter", "retrain.lora.lora_alpha=8"])
    assert err.value.problems[0].startswith("retrain.lora.lora_alpha: ") and "lora" in err.value.problems[0]
    load_config(path, ["retrain.preset=lora", "retrain.lora.lora_alpha=8"])


def test_layer_refuses_bad_alpha():
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(SpaceError, match="lora_alpha"):
            GLoraLinear(nn.Linear(3, 2), CHOICES, lora_scaling=LoraScaling(bad))


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_save_load_round_trip_keeps_the_scale(tmp_path, conv):
    torch.manual_seed(0)
    base = (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)) if conv
            else nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
    space = {"targets": "all-conv" if conv else "all-linear", "choices": CHOICES}
    scaling = LoraScaling(6.0, use_rslora=True)
    model = apply_glora(copy.deepcopy(base), space, lora_scaling=scaling)
    for i, (_, layer) in enumerate(glora_layers(model)):
        _randomise(layer, torch.Generator().manual_seed(i))
    set_subnet(model, uniform_subnet(model, {"A": "lora2", "B": "lora4", "C": "lora2", "D": "vector", "E": "scalar"}))
    x = torch.randn(2, 3, 6, 6) if conv else torch.randn(2, 6)
    y = model(x)
    save_adapter(model, tmp_path / "a.safetensors")
    doc = yaml.safe_load((tmp_path / "a.yaml").read_text())
    assert all(rec["lora_alpha"] == 6.0 and rec["use_rslora"] is True for rec in doc["layers"].values())
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors")
    assert {layer.lora_scaling for _, layer in glora_layers(loaded)} == {scaling}
    torch.testing.assert_close(loaded(x), y, atol=1e-6, rtol=0)
    # from the safetensors header alone too, and onto a model already wrapped with another scale
    (tmp_path / "a.yaml").unlink()
    other = apply_glora(copy.deepcopy(base), space, lora_scaling=LoraScaling(1.0))
    loaded = load_adapter(other, tmp_path / "a.safetensors")
    assert {layer.lora_scaling for _, layer in glora_layers(loaded)} == {scaling}
    torch.testing.assert_close(loaded(x), y, atol=1e-6, rtol=0)
    torch.testing.assert_close(merge_glora(loaded)(x), y, atol=1e-5, rtol=0)
    # an unscaled model writes no scaling keys: its files are as they were
    set_lora_scaling(model, None)
    save_adapter(model, tmp_path / "b.safetensors")
    assert not any("lora_alpha" in rec for rec in yaml.safe_load((tmp_path / "b.yaml").read_text())["layers"].values())


def test_retrain_lora_preset_with_alpha_runs_and_merges(tmp_path):
    out = tmp_path / "run"
    cfg = config_from_dict(tiny_config(out, retrain={"preset": "lora", "rank": 4, "init": "scratch",
                                                     "lora": {"lora_alpha": 8}}))
    assert run_retrain(cfg, dist.DistInfo(), "t.yaml") == "done"
    doc = yaml.safe_load((out / "retrain" / "subnet.yaml").read_text())
    assert {(rec["lora_alpha"], rec["use_rslora"]) for rec in doc["layers"].values()} == {(8.0, False)}
    assert (out / "retrain" / "merged.safetensors").is_file()
