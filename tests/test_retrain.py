"""Stage 3: presets through the same path, merged export, the refusal path, metrics."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from conftest import needs_cxx
from engine import distributed as dist
from engine.config import ConfigError, config_from_dict, load_config
from engine.data import build_splits
from engine.recipes.common import load_supernet, probe_input
from engine.recipes.retrain import run_retrain
from engine.recipes.search import run_search
from engine.recipes.train import run_train
from engine.trainer import TrainError, evaluate
from runcfg import TINY, tiny_config, trainer_hooks, write_config
from supernet import MergeError, load_merged, load_subnet, set_subnet

INFO = dist.DistInfo()
DIMS = {"qkv": (32, 96), "proj": (32, 32), "fc1": (32, 128), "fc2": (128, 32)}  # (in, out) of the tiny ViT
LAYERS = [DIMS[k] for _ in range(2) for k in ("qkv", "proj", "fc1", "fc2")]


def _spec_count(preset: str, r: int = 8) -> int:
    """docs/method.md §2's table, summed over the tiny ViT's 8 linear layers."""
    per = {
        "lora": lambda i, o: r * (o + i),
        "ssf": lambda i, o: 3 * o,
        "bitfit": lambda i, o: o,
        "prompt": lambda i, o: i,
        "linear": lambda i, o: 0,
    }[preset]
    return sum(per(i, o) for i, o in LAYERS)


def _retrain(out, **retrain):
    return run_retrain(config_from_dict(tiny_config(out, retrain=retrain)), INFO, "t.yaml")


@pytest.mark.parametrize("preset", ["lora", "ssf", "bitfit", "prompt", "linear", "full"])
def test_presets(tmp_path, preset):
    out = tmp_path / preset
    assert _retrain(out, preset=preset, rank=4 if preset == "lora" else 8) == "done"
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=4)
    head = sum(p.numel() for p in base.head.parameters())
    if preset == "full":
        assert m["adapter_params"] == sum(p.numel() for p in base.parameters()) - head
    else:
        assert m["adapter_params"] == _spec_count(preset, 4)
    assert m["head_params"] == head and m["trainable_params"] == m["adapter_params"] + head
    assert 0 <= m["test_top1"] <= 100 and m["method"] == preset
    merged = load_file(out / "retrain" / "merged.safetensors")
    base.load_state_dict(merged, strict=True)  # an ordinary timm model
    assert m["merged_model_params"] == sum(p.numel() for p in base.parameters())
    assert (out / "retrain" / "adapter.safetensors").exists() == (preset not in ("linear", "full"))


def test_merged_export_predicts_like_unmerged(tmp_path, monkeypatch):
    import engine.recipes.retrain as st

    captured = {}
    real_export = st.export

    def spy(model, cfg, rdir, val_ds, info, spec, num_classes):
        captured["model"] = model
        captured["x"] = next(iter(torch.utils.data.DataLoader(val_ds, batch_size=24)))[0]
        return real_export(model, cfg, rdir, val_ds, info, spec, num_classes)

    monkeypatch.setattr(st, "export", spy)
    out = tmp_path / "run"
    run_train(config_from_dict(tiny_config(out)), INFO, "t.yaml")
    run_search(config_from_dict(tiny_config(out, search={"max_params": 15000})), INFO, "t.yaml")
    assert _retrain(out) == "done"
    fresh = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=4)
    fresh.load_state_dict(load_file(out / "retrain" / "merged.safetensors"), strict=True)
    fresh.eval()
    with torch.no_grad():
        want = captured["model"].eval()(captured["x"])
        got = fresh(captured["x"])
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(got.argmax(1), want.argmax(1))
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    result = (out / "search" / "result.yaml").read_text()
    assert f"params: {m['adapter_params']}" in result  # the retrained model holds exactly the searched tensors
    assert (out / "retrain" / "subnet.yaml").is_file()


SWIN = {"name": "swin_tiny_patch4_window7_224", "pretrained": False, "drop_path_rate": 0.0,
        "kwargs": {"img_size": 32, "window_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}}


def test_merge_that_gives_a_bias_free_layer_a_bias(tmp_path, monkeypatch, capsys):
    """Swin's patch-merging reduction has no bias; bitfit's E on it gives the merged layer one, a key
    a fresh timm Swin lacks. The export says which layers, supernet.load_merged adds them and loads
    strictly with the retrained model's outputs, and evaluate.py scores the file as retrain did."""
    import engine.recipes.retrain as st
    from safetensors import safe_open

    from engine.evaluate import main as evaluate_main
    from supernet import load_merged

    captured = {}
    real_export = st.export

    def spy(model, cfg, rdir, val_ds, info, spec, num_classes):
        captured["model"], captured["x"] = model, next(iter(torch.utils.data.DataLoader(val_ds, batch_size=8)))[0]
        return real_export(model, cfg, rdir, val_ds, info, spec, num_classes)

    monkeypatch.setattr(st, "export", spy)
    out = tmp_path / "swin"
    cfg = tiny_config(out, model=SWIN, retrain={"preset": "bitfit"})
    assert run_retrain(config_from_dict(cfg), INFO, "t.yaml") == "done"
    path = out / "retrain" / "merged.safetensors"
    assert "1 layer(s) without a bias gained one in the merge" in capsys.readouterr().err
    with safe_open(str(path), framework="pt") as fh:
        assert json.loads(fh.metadata()["added_biases"]) == ["layers.1.downsample.reduction"]
    fresh = lambda: timm.create_model(SWIN["name"], num_classes=4, **SWIN["kwargs"]).eval()  # noqa: E731
    with pytest.raises(RuntimeError, match="layers.1.downsample.reduction.bias"):
        fresh().load_state_dict(load_file(path), strict=True)
    model = load_merged(fresh(), path)
    with torch.no_grad():
        assert (model(captured["x"]) - captured["model"].eval()(captured["x"])).abs().max() <= 1e-4

    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert evaluate_main(argv=["--config", str(tmp_path / "run.yaml"), "--checkpoint", str(path)]) == 0
    metrics = json.loads((out / "retrain" / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out)["top1"] == metrics["test_top1"]
    assert metrics["merged_added_biases"] == ["layers.1.downsample.reduction"]
    assert metrics["merged_model_params"] == sum(p.numel() for p in model.parameters())


def test_refuses_to_write_when_merge_disagrees(tmp_path, monkeypatch):
    import dataclasses

    import methods  # export merges with the registered method's merge

    def bad_merge(model):
        from supernet import merge_glora

        merged = merge_glora(model)
        with torch.no_grad():
            merged.blocks[0].mlp.fc1.bias.add_(1.0)  # a broken merge
        return merged

    monkeypatch.setitem(methods.REGISTRY, "lora", dataclasses.replace(methods.get("lora"), merge=bad_merge))
    with pytest.raises(MergeError, match="not written"):
        _retrain(tmp_path / "run", preset="lora")
    assert not (tmp_path / "run" / "retrain" / "merged.safetensors").exists()
    assert not (tmp_path / "run" / "retrain" / "metrics.json").exists()


@needs_cxx
def test_compiled_retrain_matches_eager(tmp_path):
    """retrain.compile: the same training up to rounding, and the same checkpoint and exports.
    The compiled run asks for reduce-overhead, which on a CPU compiles as the default mode: the
    mode travels from the config to torch.compile."""
    from engine.checkpoint import load_checkpoint

    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        out = tmp_path / name
        mode = dict(compile_mode="reduce-overhead") if compiled else {}
        assert _retrain(out, preset="ssf", epochs=2, compile=compiled, **mode) == "done"  # vector A and E: _ScaleShiftLinear
        runs[name] = (
            load_file(out / "retrain" / "adapter.safetensors"),
            load_checkpoint(out / "retrain" / "checkpoints" / "last.pt")["model"],
            json.loads((out / "retrain" / "metrics.json").read_text()),
        )
    (ad_e, ck_e, m_e), (ad_c, ck_c, m_c) = runs["eager"], runs["compiled"]
    assert set(ck_c) == set(ck_e) and set(ad_c) == set(ad_e)  # no "_orig_mod." prefixes
    moved = 0
    for k in ad_e:
        torch.testing.assert_close(ad_c[k], ad_e[k], rtol=0, atol=1e-3)  # Adam turns rounding-level gradient noise near zero into up to lr per step
        moved += int(ad_e[k].abs().max() > 0)
    assert moved > 0  # training changed the adapters, so the comparison means something
    assert m_c["adapter_params"] == m_e["adapter_params"]


def test_compile_failure_is_one_clear_error(tmp_path):
    import torch._inductor.config as inductor_config
    import torch._inductor.utils as inductor_utils

    from engine.compiling import CompileError

    fresh_cache = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    out = tmp_path / "run"
    torch._dynamo.reset()
    # no C++ compiler, and a fresh, empty kernel cache (kernels compiled by an earlier test would
    # need none); config.patch restores the setting afterwards, for the tests that follow
    with inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}), fresh_cache(), pytest.raises(
        CompileError, match=r"^retrain\.compile: torch\.compile failed \(.*compiler.*\); set retrain\.compile: false to run without it$"
    ):
        _retrain(out, preset="ssf", compile=True)
    torch._dynamo.reset()
    assert not (out / "retrain" / "checkpoints" / "last.pt").exists()


def test_rerun_with_a_preset_leaves_no_stale_adapter_and_the_summary_says_so(tmp_path):
    """retrain --overwrite with the linear preset where a GLoRA retrain ran before: the old
    adapter.safetensors and subnet.yaml described another model and are removed, and the summary
    neither credits the search nor lists files that are not there."""
    from engine.summary import summarise

    out = tmp_path / "run"
    assert _retrain(out, preset="ssf") == "done"
    assert (out / "retrain" / "adapter.safetensors").is_file()
    assert run_retrain(config_from_dict(tiny_config(out, retrain={"preset": "linear"})), INFO, "t.yaml", overwrite=True) == "done"
    assert not (out / "retrain" / "adapter.safetensors").exists() and not (out / "retrain" / "subnet.yaml").exists()
    text = summarise(out)
    assert "search:   not used: retrain trained the 'linear' preset" in text
    assert "adapter.safetensors" not in text and "merged.safetensors (plain timm weights)" in text


def test_retrain_from_the_supernet_needs_only_its_space(tmp_path):
    """Retraining from the supernet's slices uses its structure, not how it was trained: a run config
    whose train section changed since train.py retrains; one whose space changed is refused."""
    from conftest import ROOT
    from engine.config import ConfigError
    from engine.recipes.common import load_supernet
    from supernet import sample_subnet, save_subnet

    out = tmp_path / "run"
    run_train(config_from_dict(tiny_config(out)), INFO, "t.yaml")
    model = load_supernet(config_from_dict(tiny_config(out)), 4, INFO, "t.yaml")
    save_subnet(sample_subnet(model, torch.Generator().manual_seed(0)), tmp_path / "s.yaml")
    retrain = {"init": "supernet", "subnet": str(tmp_path / "s.yaml")}
    assert run_retrain(config_from_dict(tiny_config(out, train={"lr": 0.5}, retrain=retrain)), INFO, "t.yaml") == "done"
    small = str(ROOT / "configs" / "space" / "small.yaml")
    with pytest.raises(ConfigError, match=r"supernet\.safetensors was trained with another configuration \(space;"):
        run_retrain(config_from_dict(tiny_config(out, space=small, retrain=retrain)), INFO, "t.yaml", overwrite=True)


def test_retraining_afresh_removes_the_previous_exports_first(tmp_path):
    """--overwrite: a retrain stopped before its end must not leave the earlier run's merged model
    and metrics to be read as its own."""
    out = tmp_path / "run"
    assert _retrain(out, preset="ssf") == "done"
    cfg = config_from_dict(tiny_config(out, retrain={"preset": "bitfit"}))
    with trainer_hooks(stop_at_step=1):
        assert run_retrain(cfg, INFO, "t.yaml", overwrite=True) == "SIGTERM"
    for name in ("merged.safetensors", "metrics.json", "adapter.safetensors", "subnet.yaml"):
        assert not (out / "retrain" / name).exists(), name


def test_choice_counts_line():
    from engine.summary import choice_counts

    subnet = {"a": {"A": "lora4", "B": "none", "C": "vector", "D": "scalar", "E": "vector"},
              "b": {"A": "lora4", "B": "scalar", "C": "none", "D": "none", "E": "vector"},
              "c": {"A": "vector", "B": "none", "C": "none", "D": "none", "E": "scalar"}}
    assert choice_counts(subnet) == ("A: lora4 x2, vector x1 | B: none x2, scalar x1 | C: none x2, vector x1 | "
                                     "D: none x2, scalar x1 | E: vector x2, scalar x1")


def test_resuming_a_retrain_of_another_subnetwork_is_refused(tmp_path):
    """The search run again after a retrain began (here: another seed, --overwrite) holds another
    sub-network: resuming the retrain would load tensors of the old one into the new. It stops with
    one line naming the checkpoint and result.yaml; --overwrite retrains the new one."""
    import yaml

    from engine.cli import main as cli
    from runcfg import write_config

    cfg = str(write_config(tmp_path / "c.yaml", tmp_path / "run"))
    for stage in ("train", "search", "retrain"):
        assert cli(stage, ["--config", cfg]) == 0
    before = yaml.safe_load((tmp_path / "run" / "search" / "result.yaml").read_text())["subnet"]
    assert cli("search", ["--config", cfg, "--set", "search.seed=5", "--overwrite"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "search" / "result.yaml").read_text())["subnet"] != before
    with pytest.raises(TrainError, match=r"last\.pt: written while retraining another sub-network than .*result\.yaml holds now"):
        run_retrain(config_from_dict(yaml.safe_load(open(cfg))), INFO, cfg)
    assert cli("retrain", ["--config", cfg, "--overwrite"]) == 0


def test_summary_compares_with_baseline_runs(tmp_path):
    """engine.summary --baseline: one line per run, the summarised run first, each with its own
    test accuracy and adapter count read from its metrics.json."""
    import json

    from engine.summary import summarise

    a, b = tmp_path / "a", tmp_path / "b"
    assert _retrain(a, preset="ssf") == "done" and _retrain(b, preset="lora") == "done"
    text = summarise(a, [b])
    rows = [line for line in text.splitlines() if line.startswith("compare:")]
    ma, mb = (json.loads((d / "retrain" / "metrics.json").read_text()) for d in (a, b))
    assert len(rows) == 2 and "ssf" in rows[0] and "lora" in rows[1]
    for row, m in zip(rows, (ma, mb)):
        assert f"{m['test_top1']:6.2f}%" in row and f"{m['adapter_params']:>9,} adapter" in row
    assert "compare:" not in summarise(a)


def test_inherit_tests_and_exports_the_supernets_own_subnetwork(tmp_path):
    """retrain.init: inherit: no training step, no checkpoint; the merged export predicts as the
    supernet with the searched sub-network active, and the test accuracy is that model's."""
    info = dist.DistInfo()
    out = tmp_path / "run"
    # a backbone from a file: the same frozen weights in every stage and here, whatever the random state
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=4)
    save_file(backbone.state_dict(), tmp_path / "backbone.safetensors")
    cfg = config_from_dict(tiny_config(out, retrain={"init": "inherit"},
                                       model={**TINY["model"], "checkpoint": str(tmp_path / "backbone.safetensors")}))
    assert run_train(cfg, info, "t.yaml") == "done" and run_search(cfg, info, "t.yaml") == "done"
    assert run_retrain(cfg, info, "t.yaml") == "done"
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    assert m["epochs"] == 0 and m["init"] == "inherit" and m["exported"] == "merged.safetensors"
    assert not (out / "retrain" / "checkpoints" / "last.pt").exists()
    _, test_ds, n = build_splits(cfg.data, "final", *probe_input(cfg))
    supernet = load_supernet(cfg, n, info, "t.yaml", same_training=False)
    set_subnet(supernet, load_subnet(out / "search" / "result.yaml"))
    loader = torch.utils.data.DataLoader(test_ds, batch_size=32)
    assert evaluate(supernet, loader, info)["top1"] == pytest.approx(m["test_top1"])
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=n)
    merged = load_merged(base, out / "retrain" / "merged.safetensors").eval()
    x = next(iter(loader))[0]
    torch.testing.assert_close(merged(x), supernet.eval()(x), atol=1e-4, rtol=0)
    path = write_config(tmp_path / "c.yaml", tmp_path / "other", retrain={"init": "inherit"})
    for override, key in (("retrain.preset=lora", "retrain.init"), ("retrain.lora.lora_alpha=8", "retrain.lora.lora_alpha")):
        with pytest.raises(ConfigError) as err:
            load_config(path, [override])
        assert len(err.value.problems) == 1 and err.value.problems[0].startswith(key + ":"), err.value.problems
