"""Search-space and configuration validation: every error names the offending key and what is allowed."""

import pytest
import torch.nn as nn
import yaml

import models
from conftest import ROOT
from supernet import SpaceError, apply_glora, load_space, parse_choice, set_subnet

GOOD = {"A": ["lora8", "lora4", "vector", "scalar", "none"], "B": ["lora8", "vector", "none"],
        "C": ["lora8", "vector", "none"], "D": ["vector", "scalar", "none"], "E": ["vector", "scalar", "none"]}


def _space(**choices):
    return {"targets": "all-linear", "choices": {**GOOD, **choices}}


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs" / "space").glob("*.yaml") if p.stem != "noah"),
                         ids=lambda p: p.stem)
def test_shipped_spaces_load(path):
    space = load_space(path)
    assert [str(c) for c in space.choices["D"]] == ["vector", "scalar", "none"]
    ranks = {c.rank for c in space.choices["A"] if c.kind == "lora"}
    assert ranks == {"large": {8, 4}, "middle": {4, 2}, "small": {2}, "conv": {8, 4}}[path.stem]


@pytest.mark.parametrize(
    "choices,key,allowed",
    [
        ({"D": ["lora4"]}, "choices.D", "vector, scalar (or constant), none"),
        ({"E": ["lora2", "none"]}, "choices.E", "vector, scalar"),
        ({"C": ["scalar"]}, "choices.C", "lora<r> (r >= 1), vector, none"),
        ({"A": ["lora0"]}, "choices.A", "lora<r>"),
        ({"A": ["lora-3"]}, "choices.A", "lora<r>"),
        ({"B": ["vectr"]}, "choices.B", "vector"),
        ({"B": [8]}, "choices.B", "vector"),
        ({"C": []}, "choices.C", "non-empty list"),
        ({"Q": ["none"]}, "choices.Q", "A, B, C, D, E"),
    ],
)
def test_bad_choices_name_key_and_allowed(choices, key, allowed):
    with pytest.raises(SpaceError) as err:
        load_space(_space(**choices))
    assert key in str(err.value) and allowed in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_top_level_key_and_missing_tensor():
    with pytest.raises(SpaceError, match=r"target: unknown key; allowed: targets, exclude, choices"):
        load_space({"target": "all-linear", "choices": GOOD})
    bad = dict(GOOD)
    bad.pop("E")
    with pytest.raises(SpaceError, match=r"choices\.E: missing"):
        load_space({"choices": bad})


def test_all_problems_reported_at_once():
    with pytest.raises(SpaceError) as err:
        load_space({"choices": {**GOOD, "D": ["lora4"], "A": ["vectr"]}, "extra": 1})
    msg = str(err.value)
    assert "choices.D" in msg and "choices.A" in msg and "extra" in msg


def test_constant_is_scalar():
    assert parse_choice("constant", "D") == parse_choice("scalar", "D")
    space = load_space(_space(E=["constant", "vector"]))
    assert [str(c) for c in space.choices["E"]] == ["scalar", "vector"]


def test_yaml_file_errors_name_the_file(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("choices: [unclosed\n")
    with pytest.raises(SpaceError, match="s.yaml: not valid YAML"):
        load_space(p)
    with pytest.raises(SpaceError, match="nope.yaml: search space file not found"):
        load_space(tmp_path / "nope.yaml")
    p.write_text(yaml.safe_dump(_space(D=["lora4"])))
    with pytest.raises(SpaceError, match=r"s.yaml: choices\.D"):
        load_space(p)


def test_target_matching_nothing_lists_layers():
    with pytest.raises(SpaceError) as err:
        apply_glora(models.vit(), {"targets": ["qkv", "nonexistent_layer"], "choices": GOOD})
    msg = str(err.value)
    assert "targets[1]" in msg and "nonexistent_layer" in msg and "blocks.0.attn.qkv" in msg


def test_target_that_is_not_linear():
    # Since GLoRA adapts convolutions (issue 22) a pattern naming a Conv2d adapts it; it used to be refused
    m = apply_glora(models.vit(), {"targets": ["patch_embed.proj"], "choices": GOOD})
    assert type(m.patch_embed.proj).__name__ == "GLoraConv2d"
    with pytest.raises(SpaceError, match=r"targets\[0\].*norm1, a LayerNorm, not an nn\.Linear or nn\.Conv2d"):
        apply_glora(models.vit(), {"targets": [r"blocks\.0\.norm1"], "choices": GOOD})
    with pytest.raises(SpaceError, match=r"norm.*LayerNorm"):
        apply_glora(models.vit(), {"targets": [r"blocks\.0\.norm1"], "choices": GOOD})


def test_targets_regex_and_exclude():
    m = apply_glora(models.vit(), {"targets": [r"blocks\.\d+\.mlp\.fc\d"], "exclude": ["blocks.1.mlp.fc2"], "choices": GOOD})
    names = [n for n, mod in m.named_modules() if type(mod).__name__ == "GLoraLinear"]
    assert names == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1"]
    assert isinstance(m.head, nn.Linear)


def test_apply_twice_is_an_error():
    m = apply_glora(models.vit(), {"targets": ["qkv"], "choices": GOOD})
    with pytest.raises(SpaceError, match="already a GLoRA layer"):
        apply_glora(m, {"targets": ["qkv"], "choices": GOOD})


def test_subnet_errors_name_layer_and_tensor():
    m = apply_glora(models.mlp(), {"targets": "all-linear", "exclude": ["head"], "choices": GOOD})
    ok = {"A": "none", "B": "none", "C": "none", "D": "none", "E": "none"}
    with pytest.raises(SpaceError, match=r"unknown layer\(s\) fc9"):
        set_subnet(m, {"fc1": ok, "fc2": ok, "fc9": ok})
    with pytest.raises(SpaceError, match=r"missing layer\(s\) fc2"):
        set_subnet(m, {"fc1": ok})
    with pytest.raises(SpaceError, match=r"fc1\.B: 'lora4' is not allowed; allowed: lora8, vector, none"):
        set_subnet(m, {"fc1": {**ok, "B": "lora4"}, "fc2": ok})
    with pytest.raises(SpaceError, match=r"fc2\.D: 'vector' is not allowed; allowed: none \(no bias"):
        set_subnet(m, {"fc1": ok, "fc2": {**ok, "D": "vector"}})
    with pytest.raises(SpaceError, match=r"fc1\.A: 'vectr' is not a valid choice"):
        set_subnet(m, {"fc1": {**ok, "A": "vectr"}, "fc2": ok})
    with pytest.raises(SpaceError, match=r"fc1: missing key\(s\) E"):
        set_subnet(m, {"fc1": {k: v for k, v in ok.items() if k != "E"}, "fc2": ok})
