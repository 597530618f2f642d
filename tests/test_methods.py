"""Every registered method, on the tiny ViT: settings validated, only the method's parameters and
the head train, the count is what trains, step 0 is the base model where the method allows it, a
training step moves the output, and a mergeable method merges into the plain timm model exactly."""

import copy

import pytest
import torch

import methods
from conftest import LARGE_SPACE, tiny_vit
from supernet import classifier_names, load_space

CASES = [(name, size) for name, m in methods.REGISTRY.items() for size in (m.test_sizes if m.size else (None,))]


def _adapted(name: str, size, seed: int = 0):
    torch.manual_seed(seed)
    base = tiny_vit().eval()
    model = copy.deepcopy(base)
    m = methods.get(name)
    m.apply(model, m.settings(size=size), load_space(LARGE_SPACE))
    return base, model.eval(), m


@pytest.mark.parametrize("name,size", CASES)
def test_only_the_method_and_head_train_and_the_count_is_what_trains(name, size):
    _, model, m = _adapted(name, size)
    heads = tuple(h + "." for h in classifier_names(model))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(n.startswith(h) for n in trainable) for h in heads), "the classifier must train"
    outside = sum(v for n, v in trainable.items() if not n.startswith(heads))
    assert m.count(model) == outside
    if name == "linear":
        assert outside == 0
    elif name != "glora":
        assert outside > 0


@pytest.mark.parametrize("name,size", CASES)
def test_starts_at_the_base_model_and_a_step_moves_it(name, size):
    base, model, m = _adapted(name, size)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want, got = base(x), model(x)
    assert torch.isfinite(got).all()
    if m.starts_at_base:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # one step on the method's own parameters (head frozen): the backbone's output must change
    # unless the method has none (linear probing)
    heads = tuple(h + "." for h in classifier_names(model))
    own = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(heads)]
    if not own:
        return
    feats_before = model.forward_head(model.forward_features(x), pre_logits=True).detach()
    opt = torch.optim.SGD(own, lr=0.5)
    for _ in range(2):  # zero-initialised factors need a second step to move the output
        loss = model(x).logsumexp(-1).sum() + model.forward_head(model.forward_features(x), pre_logits=True).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        feats_after = model.forward_head(model.forward_features(x), pre_logits=True)
    assert (feats_after - feats_before).abs().max() > 1e-6


@pytest.mark.parametrize("name,size", [c for c in CASES if methods.get(c[0]).mergeable])
def test_merge_is_the_plain_model_and_predicts_as_unmerged(name, size):
    base, model, m = _adapted(name, size, seed=1)
    with torch.no_grad():  # random (non-zero) values in every trainable tensor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        merged = m.merge(copy.deepcopy(model)).eval()
        got = merged(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = tiny_vit()
    if name == "glora" or m.name in ("lora", "ssf", "bitfit", "prompt"):
        from supernet import load_merged  # layers the merge gave a bias (E, C on bias-free ones) are added first

        load_merged(plain, merged.state_dict())
    else:
        plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n, m in methods.REGISTRY.items() if m.size])
def test_size_is_validated(name):
    with pytest.raises(methods.MethodError, match=methods.get(name).size):
        methods.get(name).settings(size=0)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(methods.MethodError, match="registered: glora, lora"):
        methods.get("loar")


def test_presets_are_every_method_but_the_searched_ones():
    assert set(methods.PRESETS) == set(methods.REGISTRY) - {"glora", "noah"}
    assert {"lora", "ssf", "bitfit", "prompt", "linear", "full"} <= set(methods.PRESETS)
