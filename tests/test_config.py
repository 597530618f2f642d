"""Run-config validation: every problem reported at once, typed overrides, shipped configs valid."""

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from engine.config import ConfigError, load_config
from runcfg import write_config


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_configs_validate(path, tmp_path):
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    assert "train.py" in header and "--config" in header and "--set" in header  # launch and override commands
    data = yaml.safe_load(path.read_text())["data"]
    # dataset roots do not exist on a test machine: point them at an empty folder (the loader's own
    # tests cover the layouts); everything else validates as shipped.
    cfg = load_config(path, [f"data.root={tmp_path}"] if data["kind"] != "demo" else [])
    assert cfg.output_dir


def test_overrides_are_typed(tmp_path):
    p = write_config(tmp_path / "c.yaml", tmp_path / "out")
    cfg = load_config(p, ["train.lr=3e-4", "train.epochs=7", "search.max_params=1000", "model.kwargs={depth: 1}",
                          "train.grad_clip=null", "data.kind=demo"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and cfg.search.max_params == 1000 and cfg.model.kwargs == {"depth": 1}


def test_yaml_exponent_strings_are_floats(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: x\ntrain: {lr: 1e-4, min_lr: 1e-5}\nspace: %s\n" % (ROOT / "configs/space/small.yaml"))
    cfg = load_config(p)
    assert cfg.train.lr == 1e-4 and cfg.train.min_lr == 1e-5


def test_every_problem_reported_at_once(tmp_path):
    p = write_config(tmp_path / "c.yaml", tmp_path / "out", train={"lrr": 1, "epochs": -1, "batch_size": "big"},
                     search={"mutation_prob": 2.0}, bogus=3)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    for piece in ["train.lrr: unknown key; did you mean 'lr'?", "train.epochs: must be > 0", "train.batch_size: expected an integer",
                  "search.mutation_prob: must be between 0 and 1", "bogus: unknown key"]:
        assert piece in msg
    assert all(line.startswith(str(p)) for line in msg.splitlines())


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.name=vit_tinny_patch16_224", "model.name: 'vit_tinny_patch16_224' is not a timm model; did you mean"),
        ("data.kind=vtab1k", "data.root: required"),
        ("model.checkpoint=/nonexistent/w.safetensors", "model.checkpoint: file not found"),
        ("space=/nonexistent/space.yaml", "space: file not found"),
        ("train.precision=fp8", "train.precision: expected one of fp32, bf16, fp16"),
        ("search.top_k=100", "search.top_k: must be <= search.population"),
        ("retrain.preset=lora2", "retrain.preset: expected one of lora, ssf, bitfit"),
        ("retrain.method_args={rank: 2}", "retrain.method_args: settings of a retrain.preset, but none is set"),
        ("search.compile_mode=turbo", "search.compile_mode: expected one of default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs"),
    ],
)
def test_semantic_errors(tmp_path, override, needle):
    p = write_config(tmp_path / "c.yaml", tmp_path / "out")
    with pytest.raises(ConfigError, match=None) as err:
        load_config(p, [override])
    assert needle in str(err.value)


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    p = write_config(tmp_path / "c.yaml", tmp_path / "out", train={"epochs": 0})
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(p)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "train.epochs: must be > 0" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_resolved_config_round_trips(tmp_path):
    p = write_config(tmp_path / "c.yaml", tmp_path / "out")
    cfg = load_config(p, ["train.lr=0.5"])
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again) == cfg
    assert yaml.safe_load(cfg.to_yaml())["train"]["lr"] == 0.5


def test_budget_no_configuration_meets(tmp_path):
    space = {"targets": "all-linear", "choices": {"A": ["lora4", "vector"], "B": ["scalar"], "C": ["vector"],
                                                  "D": ["scalar"], "E": ["vector"]}}
    p = write_config(tmp_path / "c.yaml", tmp_path / "out", space=space, search={"max_params": 10})
    with pytest.raises(ConfigError, match=r"search\.max_params: 10 is below the smallest configuration of this space \(1,"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"search\.min_params: .* is above the largest"):
        load_config(p, ["search.max_params=null", "search.min_params=100000000"])


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """retrain/search.compile_mode: "default" is torch.compile's own default (mode=None), the others pass through;
    CUDA graphs (and so a step marker per step) only on a CUDA device."""
    import torch

    from engine.compiling import COMPILE_MODES, compile_model, uses_cuda_graphs

    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    model = torch.nn.Linear(2, 2)
    for mode in COMPILE_MODES:
        assert compile_model(model, mode) is model
    assert seen == [None, "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    with pytest.raises(ValueError, match="not one of default, reduce-overhead"):
        compile_model(model, "fast")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_cuda_graphs("reduce-overhead", cuda) and uses_cuda_graphs("max-autotune", cuda)
    assert not uses_cuda_graphs("reduce-overhead", cpu) and not uses_cuda_graphs("default", cuda)
    assert not uses_cuda_graphs("max-autotune-no-cudagraphs", cuda)


def test_space_found_from_any_working_directory(tmp_path, monkeypatch):
    """A shipped config run from another directory: its `configs/space/large.yaml` is found in this
    repository; a bare name picks a shipped space; a path next to the config works; a path that
    works as given is kept as given (the run's fingerprint does not change)."""
    p = write_config(tmp_path / "c.yaml", tmp_path / "out")
    (tmp_path / "mine.yaml").write_text((ROOT / "configs" / "space" / "small.yaml").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(p, ["space=configs/space/large.yaml"]).space == str(ROOT / "configs" / "space" / "large.yaml")
    assert load_config(p, ["space=middle"]).space == str(ROOT / "configs" / "space" / "middle.yaml")
    assert load_config(p, ["space=mine.yaml"]).space == str(tmp_path / "mine.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_config(p, ["space=mine.yaml"]).space == "mine.yaml"
    with pytest.raises(ConfigError, match=r"space: file not found: huge \(looked in the working directory, next to the config "
                                          r".*among the shipped spaces: conv, large, middle, noah, small\)"):
        load_config(p, ["space=huge"])


def test_the_space_is_parsed_once_when_the_config_loads(tmp_path, monkeypatch):
    """load_config and config_from_dict keep the parsed space on the config (search_space), so the
    stages do not parse it again; `space` stays as given (to_dict, config.yaml, fingerprints and the
    configuration reference hold no parsed copy), and a config whose `space` changes since is parsed anew."""
    import dataclasses

    import engine.config as C
    from runcfg import tiny_config

    parses = []
    real = C.parse_space
    monkeypatch.setattr(C, "parse_space", lambda space: parses.append(space) or real(space))
    small = str(ROOT / "configs" / "space" / "small.yaml")
    for make in (lambda: load_config(write_config(tmp_path / "c.yaml", tmp_path / "out", space=small)),
                 lambda: C.config_from_dict(tiny_config(tmp_path / "out", space=yaml.safe_load(open(small))))):
        cfg = make()
        assert len(parses) == 1
        space = cfg.search_space
        assert cfg.search_space is space and len(parses) == 1 and space.to_dict() == real(small).to_dict()
        assert list(cfg.to_dict()) == [f.name for f in dataclasses.fields(cfg)] and "search_space" not in repr(cfg)
        assert cfg.to_dict()["space"] in (small, yaml.safe_load(open(small)))
        parses.clear()
    cfg.space = str(ROOT / "configs" / "space" / "large.yaml")
    assert cfg.search_space.source == cfg.space and len(parses) == 1
    cfg.space = yaml.safe_load(open(small))
    cfg.space["choices"]["A"] = ["none"]  # changed in place, after being parsed
    assert cfg.search_space.to_dict()["choices"]["A"] == ["none"]
    assert "search_space" not in (ROOT / "docs" / "configuration.md").read_text()


def test_data_normalize_resolves_and_keeps_older_runs_resumable(tmp_path):
    """data.normalize: model gives the backbone's pre-training mean/std (0.5 for timm's ViTs), imagenet
    (the default) ImageNet's. A run written before the key existed compares equal to one at the default,
    so its fingerprint and resumption do not change; another value is a difference."""
    from engine.config import config_from_dict
    from engine.recipes.common import probe_input
    from engine.rundir import config_differences, fingerprint, relevant_config
    from runcfg import tiny_config

    cfg = config_from_dict(tiny_config(tmp_path))
    assert probe_input(cfg)[1:] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    old = cfg.to_dict()
    del old["data"]["normalize"]
    assert config_differences(relevant_config(old, "train"), relevant_config(cfg.to_dict(), "train")) == []
    other = config_from_dict(tiny_config(tmp_path, data={"normalize": "model"}))
    assert probe_input(other)[1:] == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert config_differences(relevant_config(old, "train"), relevant_config(other.to_dict(), "train")) == ["data.normalize"]
    assert fingerprint(other, "train") != fingerprint(cfg, "train")


def test_testing_aids_moved_out_of_the_schema(tmp_path):
    """train.fail_at_step / stop_at_step became environment variables read by the trainer: a null
    value (every config.yaml written before has one) still loads, any other is refused in one line."""
    load_config(write_config(tmp_path / "old.yaml", tmp_path / "run", train={"fail_at_step": None, "stop_at_step": None},
                             retrain={"stop_at_step": None}))
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", train={"fail_at_step": 3}, retrain={"stop_at_step": 1})
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    text = str(err.value)
    assert "train.fail_at_step: a testing aid that moved to the GLORA_TEST_FAIL_AT_STEP environment variable" in text
    assert "retrain.stop_at_step: a testing aid that moved to the GLORA_TEST_STOP_AT_STEP environment variable" in text


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["retrain.preset=lora", "retrain.method_args={rnak: 2}"], "retrain.method_args.rnak: unknown key; lora takes none (its size is retrain.rank)"),
        (["retrain.preset=ssf", "retrain.method_args={scale: 2}"], "retrain.method_args.scale: unknown key; ssf takes none"),
        (["retrain.preset=lora", "retrain.method_args={rank: 2}"], "retrain.method_args.rank: lora's size; set it with retrain.rank"),
    ],
)
def test_method_settings_are_checked_at_load(tmp_path, overrides, needle):
    p = write_config(tmp_path / "c.yaml", tmp_path / "out")
    with pytest.raises(ConfigError) as err:
        load_config(p, overrides)
    assert needle in str(err.value), str(err.value)


def test_method_settings_take_the_size_from_rank(tmp_path):
    from engine.config import method_settings

    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "out"), ["retrain.preset=lora", "retrain.rank=3"])
    method, settings = method_settings(cfg.retrain)
    assert method.name == "lora" and settings.rank == 3
