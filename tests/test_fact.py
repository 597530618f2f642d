"""FacT-TT and FacT-TK (methods/fact.py): the parameter counts of the paper on ViT-B, the forward
against ΔW_i computed here from the raw factors in float64, the exact merge, the shared factors
seen once, and the one-line refusal of a model that is not a ViT."""

import copy

import pytest
import timm
import torch

import methods
from conftest import LARGE_SPACE, tiny_vit
from methods.fact import FactLinear
from supernet import load_space

SPACE = load_space(LARGE_SPACE)


def _apply(name, model, **settings):
    m = methods.get(name)
    m.apply(model, m.settings(**settings), SPACE)
    return m


@pytest.mark.parametrize("f", [8, 16])
def test_counts_on_vit_base_are_the_papers(f):
    L, d = 12, 768
    want = {"fact_tt": 2 * d * f + 12 * L * f * f, "fact_tk": 2 * d * f + 12 * L * f + f ** 3}
    assert want["fact_tt"] == 1536 * f + 144 * f * f and want["fact_tk"] == 1536 * f + 144 * f + f ** 3
    for name, n in want.items():
        with torch.device("meta"):
            model = timm.create_model("vit_base_patch16_224", num_classes=10)
        m = _apply(name, model, size=f)
        assert m.count(model) == n
        # the shared factors appear once in the state dict, the parameters and so the optimizer
        own = [k for k in model.state_dict() if k.startswith("fact.")]
        assert sorted(own) == sorted({"fact_tt": ["fact.U", "fact.V", "fact.sigmas"],
                                      "fact_tk": ["fact.U", "fact.V", "fact.core", "fact.P"]}[name])
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(trainable) == len({id(p) for p in trainable}) == len(own) + 2  # + head weight, bias
        assert sum(isinstance(mod, FactLinear) for mod in model.modules()) == 4 * L


def _sigma(fact, i):
    """Σ_i from the raw factors, written out."""
    if hasattr(fact, "sigmas"):
        return fact.sigmas[i]
    return sum(fact.P[i, k] * fact.core[k] for k in range(fact.core.shape[0]))


def _delta(fact, i, scale):
    return scale * fact.U @ _sigma(fact, i) @ fact.V.T


def _randomised(name, rank=3, scale=0.7):
    torch.manual_seed(0)
    base = tiny_vit().double().eval()
    model = copy.deepcopy(base)
    m = _apply(name, model, size=rank, scale=scale)
    with torch.no_grad():  # every factor non-zero (U starts at zero)
        for p in model.fact.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return base, model.eval(), m


@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
def test_forward_adds_the_papers_increments(name):
    scale = 0.7
    base, model, _ = _randomised(name, scale=scale)
    fact, d = model.fact, 32
    per_block = 4 + 2 * 4  # q, k, v, proj, fc1 chunks 0..3, fc2 chunks 0..3 (MLP width 4d)
    b = 1  # the second block: its matrices follow the first block's twelve
    blk, ref = model.blocks[b], base.blocks[b]
    x = torch.randn(2, 5, d, dtype=torch.float64)
    with torch.no_grad():
        # q: rows 0..d of qkv
        q = x @ (ref.attn.qkv.weight[:d] + _delta(fact, b * per_block + 0, scale)).T + ref.attn.qkv.bias[:d]
        torch.testing.assert_close(blk.attn.qkv(x)[..., :d], q, rtol=0, atol=1e-10)
        # fc1 chunk 2: rows 2d..3d of fc1
        j = 2
        h = x @ (ref.mlp.fc1.weight[j * d:(j + 1) * d] + _delta(fact, b * per_block + 4 + j, scale)).T + ref.mlp.fc1.bias[j * d:(j + 1) * d]
        torch.testing.assert_close(blk.mlp.fc1(x)[..., j * d:(j + 1) * d], h, rtol=0, atol=1e-10)
        # fc2 chunk 1: columns d..2d of fc2 (an input zero outside them)
        j = 1
        u = torch.zeros(2, 5, 4 * d, dtype=torch.float64)
        u[..., j * d:(j + 1) * d] = torch.randn(2, 5, d, dtype=torch.float64)
        y = u[..., j * d:(j + 1) * d] @ (ref.mlp.fc2.weight[:, j * d:(j + 1) * d] + _delta(fact, b * per_block + 8 + j, scale)).T + ref.mlp.fc2.bias
        torch.testing.assert_close(blk.mlp.fc2(u), y, rtol=0, atol=1e-10)

        # the whole model: the base with every increment added here, block by block
        want = copy.deepcopy(base)
        for b, blk in enumerate(want.blocks):
            i = b * per_block
            for t in range(3):  # q, k, v
                blk.attn.qkv.weight[t * d:(t + 1) * d] += _delta(fact, i + t, scale)
            blk.attn.proj.weight += _delta(fact, i + 3, scale)
            for j in range(4):
                blk.mlp.fc1.weight[j * d:(j + 1) * d] += _delta(fact, i + 4 + j, scale)
                blk.mlp.fc2.weight[:, j * d:(j + 1) * d] += _delta(fact, i + 8 + j, scale)
        img = torch.randn(3, 3, 32, 32, dtype=torch.float64)
        assert (model(img) - base(img)).abs().max() > 1e-3  # the increments matter
        torch.testing.assert_close(model(img), want(img), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
def test_merge_is_exact_and_the_plain_model(name):
    _, model, m = _randomised(name)
    img = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = model(img)
        merged = m.merge(copy.deepcopy(model)).eval()
        torch.testing.assert_close(merged(img), want, rtol=0, atol=1e-10)
    assert not any(isinstance(mod, FactLinear) for mod in merged.modules()) and not hasattr(merged, "fact")
    plain = tiny_vit().double()
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(img), want, rtol=0, atol=1e-10)


def test_a_copy_shares_its_own_factors():
    _, model, _ = _randomised("fact_tk")
    twin = copy.deepcopy(model)
    layers = [mod for mod in twin.modules() if isinstance(mod, FactLinear)]
    assert layers and all(mod.factors is twin.fact for mod in layers)


def test_dropout_acts_in_training_only_on_the_increment():
    torch.manual_seed(0)
    base = tiny_vit().eval()
    model = copy.deepcopy(base)
    _apply("fact_tt", model, size=2, dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # U is zero: dropout on the low-rank code changes nothing
        torch.testing.assert_close(model.train()(x), base(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
def test_a_model_that_is_not_a_vit_is_refused_in_one_line(name):
    with torch.device("meta"):
        model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(methods.MethodError) as err:
        _apply(name, model, size=4)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and "VisionTransformer" in msg and "ResNet" in msg


@pytest.mark.parametrize("args,field", [({"scale": 0}, "scale"), ({"scale": float("nan")}, "scale"),
                                        ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
                                        ({"size": -2}, "rank")])
def test_settings_are_validated(args, field):
    for name in ("fact_tt", "fact_tk"):
        with pytest.raises(methods.MethodError, match=f"^{field}:"):
            methods.get(name).settings(**args)
