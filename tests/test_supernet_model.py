"""Whole-model properties of the supernet: surgery, sampling, counting, extraction, merging, adapter files."""

import copy

import pytest
import torch
import torch.nn as nn

import models
from conftest import LARGE_SPACE
from supernet import (
    AdapterError,
    GLoraLinear,
    LayerChoice,
    MergeError,
    SpaceError,
    SubnetSampler,
    apply_glora,
    count_params,
    extract_subnet,
    load_space,
    get_subnet,
    glora_layers,
    load_adapter,
    load_subnet,
    merge_glora,
    sample_subnet,
    save_adapter,
    save_subnet,
    set_subnet,
    uniform_subnet,
)

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _perturb(model: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "glora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _adapted(builder: str, seed: int = 0, space=LARGE_SPACE):
    torch.manual_seed(seed)
    model = models.BUILDERS[builder]().eval()
    base = copy.deepcopy(model)
    apply_glora(model, space, modules_to_save="auto")
    return base, model


@pytest.mark.parametrize("builder", list(models.BUILDERS))
def test_fresh_model_equals_base(builder):
    base, model = _adapted(builder)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        sample_subnet(model, g)
        assert torch.equal(model(X), base(X))


@pytest.mark.parametrize("builder", ["vit", "mlp"])  # mlp: a layer without a bias, whose D has one option and spends no draw
def test_subnet_sampler_draws_what_sample_subnet_draws(builder):
    """The training loop's sampler: the same configurations from the same generator state, activated
    with the plans the layers would work out themselves (it keeps them per drawn configuration)."""
    _, model = _adapted(builder)
    sampler = SubnetSampler(model)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    seen = set()
    for _ in range(200):  # enough for repeated draws to come from the sampler's cache
        want = sample_subnet(model, g1, activate=False)
        got = sampler(g2)
        assert got == want and get_subnet(model) == got
        assert all(layer._plan is layer._plan_of(layer.active) for _, layer in glora_layers(model))
        seen.add(tuple(got.values()))
    assert len(seen) == 200  # it draws, rather than repeating one configuration
    assert torch.equal(g1.get_state(), g2.get_state())  # and spends exactly as many draws
    assert sum(len(cache) for *_, cache in sampler._draws) < 200 * len(sampler._draws)  # some came from the cache
    before = get_subnet(model)
    drawn = sampler(torch.Generator().manual_seed(123), activate=False)
    assert drawn != before and get_subnet(model) == before  # activate=False leaves the model alone


@pytest.mark.parametrize("builder", list(models.BUILDERS))
def test_forward_finite_and_only_adapters_train(builder):
    _, model = _adapted(builder)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("glora_" in n or n.startswith(tuple(model.glora_modules_to_save)) for n in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith((".weight", ".bias")) and "head" not in n)
    _perturb(model)
    sample_subnet(model, torch.Generator().manual_seed(3))
    assert torch.isfinite(model(X)).all()


@pytest.mark.parametrize("builder", ["vit", "deit", "swin", "convnext", "mlp"])
def test_merge_equals_unmerged(builder):
    base, model = _adapted(builder)
    all_biased = all(layer.bias is not None for _, layer in glora_layers(model))
    _perturb(model, seed=1)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        sample_subnet(model, g)
        want = model(X)
        merged = merge_glora(copy.deepcopy(model))
        assert not any(isinstance(m, GLoraLinear) for m in merged.modules())
        diff = (merged(X) - want).abs().max().item()
        assert diff <= 1e-5, diff
        assert (want - base(X)).abs().max() > 1e-3  # the adapters really did something
    if all_biased:  # then merging adds no key: the state dict is the base model's
        ref = base.state_dict()
        got = merged.state_dict()
        assert list(got) == list(ref)
        assert all(got[k].shape == ref[k].shape for k in ref)


@pytest.mark.parametrize("builder", ["vit", "deit", "swin"])
def test_merged_loads_strictly_into_fresh_timm_model(builder):
    # Swin's patch-merging projection has no bias; adapting it with C or E would add one, so the
    # export test leaves it out (docs/method.md §1: merging then creates a bias, which timm's Swin has no slot for).
    space = {"targets": "all-linear", "exclude": ["reduction"], "choices": load_space(LARGE_SPACE).to_dict()["choices"]}
    _, model = _adapted(builder, space=space)
    _perturb(model, seed=2)
    sample_subnet(model, torch.Generator().manual_seed(1))
    want = model(X)
    merged = merge_glora(model)
    fresh = models.BUILDERS[builder]().eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    assert (fresh(X) - want).abs().max() <= 1e-5


def test_merge_without_bias_creates_bias_only_when_needed():
    _, model = _adapted("mlp")
    _perturb(model)
    set_subnet(model, {"fc1": dict(A="none", B="none", C="none", D="none", E="none"),
                       "fc2": dict(A="vector", B="none", C="vector", D="none", E="scalar")})
    want = model(X)
    merged = merge_glora(copy.deepcopy(model))
    assert merged.fc2.bias is not None and (merged(X) - want).abs().max() <= 1e-5
    # the merged state dict has a key the untouched model lacks; load_merged gives it room, strictly
    from supernet import added_biases, load_merged

    assert added_biases(model) == ["fc2"]
    base = models.mlp()
    with pytest.raises(RuntimeError, match="fc2.bias"):
        copy.deepcopy(base).load_state_dict(merged.state_dict(), strict=True)
    fresh = load_merged(copy.deepcopy(base), merged.state_dict())
    assert torch.equal(fresh(X), merged(X))
    wrong = {k: v for k, v in merged.state_dict().items() if k != "fc1.weight"}
    untouched = copy.deepcopy(base)
    with pytest.raises(AdapterError, match=r"state dict: does not fit MLP: missing fc1\.weight"):
        load_merged(untouched, wrong)
    assert untouched.fc2.bias is None  # refused before any bias was added
    set_subnet(model, {"fc1": dict(A="none", B="none", C="none", D="none", E="none"),
                       "fc2": dict(A="lora8", B="none", C="none", D="none", E="none")})
    assert added_biases(model) == []
    assert merge_glora(copy.deepcopy(model)).fc2.bias is None


def test_merge_refuses_non_finite_and_leaves_model_untouched():
    _, model = _adapted("vit")
    _perturb(model)
    set_subnet(model, uniform_subnet(model, dict(A="lora8", B="lora8", C="lora8", D="vector", E="vector")))
    last = list(glora_layers(model))[-1][1]
    with torch.no_grad():
        last.glora_E[0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="not finite"):
        merge_glora(model)
    assert sum(isinstance(m, GLoraLinear) for m in model.modules()) == 8
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_only_active_adapters_and_head_change():
    base, model = _adapted("vit")
    model.train()
    set_subnet(model, uniform_subnet(model, dict(A="vector", B="lora4", C="none", D="scalar", E="none")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        model(X).square().mean().backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not (changed & frozen)  # frozen weights bitwise equal
    assert any(n.endswith("glora_Ad") for n in changed) and any(n.endswith("glora_Bu") for n in changed)
    assert any(n.startswith("head.") for n in changed)
    # inactive tensors have no gradient, so they never move
    assert not any(n.endswith(("glora_Cd", "glora_Cu", "glora_E", "glora_Au")) for n in changed)


def test_count_params_equals_extracted_trainable():
    _, model = _adapted("vit")
    _perturb(model)
    g = torch.Generator().manual_seed(7)
    for _ in range(6):
        cfg = sample_subnet(model, g)
        want = model(X)
        counted = count_params(model, cfg)
        small = extract_subnet(copy.deepcopy(model), cfg)
        adapters = sum(p.numel() for n, p in small.named_parameters() if p.requires_grad and "glora_" in n)
        assert adapters == counted.adapter
        assert counted.head == 32 * 5 + 5
        assert torch.allclose(small(X), want, atol=1e-6, rtol=0)
        merged = merge_glora(small)
        assert (merged(X) - want).abs().max() <= 1e-5


def test_sampling_is_seeded():
    _, model = _adapted("vit")
    seq = lambda seed: [get_subnet(model) if sample_subnet(model, g) else None for g in [torch.Generator().manual_seed(seed)] for _ in range(5)]  # noqa: E731
    a1 = [sample_subnet(model, g) for g in [torch.Generator().manual_seed(11)] for _ in range(5)]
    a2 = [sample_subnet(model, g) for g in [torch.Generator().manual_seed(11)] for _ in range(5)]
    b = [sample_subnet(model, g) for g in [torch.Generator().manual_seed(12)] for _ in range(5)]
    assert a1 == a2 and a1 != b
    assert seq(11) == a1
    # every choice gets drawn eventually, uniformly per tensor
    g = torch.Generator().manual_seed(0)
    seen = {t: set() for t in "ABCDE"}
    for _ in range(60):
        for c in sample_subnet(model, g).values():
            for t, ch in c.items():
                seen[t].add(str(ch))
    assert seen["A"] == {"lora8", "lora4", "vector", "scalar", "none"} and seen["C"] == {"lora8", "lora4", "vector", "none"}


def test_subnet_yaml_round_trip(tmp_path):
    _, model = _adapted("vit")
    cfg = sample_subnet(model, torch.Generator().manual_seed(2))
    save_subnet(cfg, tmp_path / "s.yaml")
    assert load_subnet(tmp_path / "s.yaml") == cfg
    assert set_subnet(model, tmp_path / "s.yaml") == cfg
    # a file that does not fit the model: the error names the file (retrain.subnet passes its path)
    bad = dict(cfg)
    bad["blocks.0.attn.qkv"] = LayerChoice.parse({"A": "lora16", "B": "none", "C": "none", "D": "none", "E": "none"}, "x")
    save_subnet(bad, tmp_path / "bad.yaml")
    with pytest.raises(SpaceError, match=rf"^{tmp_path / 'bad.yaml'}: sub-network: blocks\.0\.attn\.qkv\.A: 'lora16' is not allowed"):
        set_subnet(model, tmp_path / "bad.yaml")
    with pytest.raises(SpaceError, match=r"^sub-network configuration: blocks\.0\.attn\.qkv\.A"):
        set_subnet(model, bad)
    assert get_subnet(model) == cfg  # untouched


def test_adapter_files_round_trip(tmp_path):
    base, model = _adapted("vit")
    _perturb(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    sample_subnet(model, torch.Generator().manual_seed(4))
    want = model(X)
    save_adapter(model, tmp_path / "adapter.safetensors")
    assert (tmp_path / "adapter.yaml").is_file()
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "adapter.safetensors")
    assert torch.equal(fresh(X), want)
    assert get_subnet(fresh) == get_subnet(model)
    # the extracted (small) form round-trips too
    small = extract_subnet(model)
    save_adapter(small, tmp_path / "small.safetensors", tmp_path / "subnet.yaml")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "small.safetensors", tmp_path / "subnet.yaml")
    assert torch.equal(fresh(X), want)
    assert count_params(fresh).adapter == sum(p.numel() for n, p in fresh.named_parameters() if "glora_" in n)


def test_adapter_refuses_mismatch(tmp_path):
    _, model = _adapted("vit")
    save_adapter(model, tmp_path / "a.safetensors")
    wider = models.vit(num_classes=7)
    with pytest.raises(AdapterError, match=r"head\.weight.*shape"):
        load_adapter(wider, tmp_path / "a.safetensors")
    assert not any(isinstance(m, GLoraLinear) for m in wider.modules())  # untouched
    with pytest.raises(AdapterError, match="blocks.0.attn.qkv is not in the model"):
        load_adapter(models.mlp(), tmp_path / "a.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(AdapterError, match="bad.safetensors"):
        load_adapter(models.vit(), tmp_path / "bad.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="empty"):
        load_adapter(models.vit(), tmp_path / "empty.safetensors")


def test_bert_is_adapted_and_merges():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 6))
    ref = bert(input_ids=ids).last_hidden_state
    apply_glora(bert, {"targets": ["query", "value", "dense"], "choices": {"A": ["lora4", "vector"], "B": ["lora4"], "C": ["vector"], "D": ["scalar"], "E": ["vector"]}})
    assert len(list(glora_layers(bert))) == 2 * 5 + 1  # pooler.dense matches too
    assert torch.equal(bert(input_ids=ids).last_hidden_state, ref)
    _perturb(bert)
    sample_subnet(bert, torch.Generator().manual_seed(0))
    want = bert(input_ids=ids).last_hidden_state
    got = merge_glora(bert)(input_ids=ids).last_hidden_state
    assert (got - want).abs().max() <= 1e-5


def test_adapter_metadata_from_yaml_or_header(tmp_path):
    from supernet import adapter_metadata

    _, model = _adapted("vit")
    save_adapter(model, tmp_path / "a.safetensors", metadata={"space": {"targets": "all-linear"}, "num_classes": 10})
    want = {"space": {"targets": "all-linear"}, "num_classes": 10}
    assert adapter_metadata(tmp_path / "a.safetensors") == want
    (tmp_path / "a.yaml").unlink()  # the same description is kept in the safetensors header
    assert adapter_metadata(tmp_path / "a.safetensors") == want
    with pytest.raises(AdapterError, match="missing.safetensors: file not found"):
        adapter_metadata(tmp_path / "missing.safetensors")
