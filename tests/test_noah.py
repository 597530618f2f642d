"""NOAH: the space, the weight-entangled blocks (slices equal the extracted sub-network), counts
against the closed formula on ViT-B/16, LoRA on q and v only, sampling and the supernet file."""

import copy

import pytest
import timm
import torch

import methods
from conftest import tiny_vit
from methods import noah
from methods.supernets import NoahSupernet, supernet_for

SPACE = {"method": "noah", "choices": {"prompt": [0, 2, 4], "lora": [0, 2, 4], "adapter": [0, 4]}}


def _supernet(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    base = tiny_vit().to(dtype).eval()
    model = copy.deepcopy(base)
    sn = NoahSupernet(SPACE)
    sn.apply(model)
    with torch.no_grad():  # every shared tensor random, so that each slice matters
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("head"):
                p.copy_(torch.randn_like(p) * 0.1)
    return base, model.eval(), sn


def test_count_on_vit_base_is_the_formula():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=10)
    m = methods.get("noah")
    m.apply(model, m.settings(prompt=10, lora=8, adapter=8), None)
    d = 768
    assert m.count(model) == 12 * (10 * d + 4 * d * 8 + (2 * d * 8 + 8 + d))


def test_all_zero_sub_network_is_the_base_model():
    base, model, sn = _supernet()
    sn.activate(model, sn.extremes(model)["smallest"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


def test_slices_of_the_supernet_equal_the_extracted_sub_network():
    _, model, sn = _supernet(dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for _ in range(4):
        config = sn.sample(model, gen)
        sn.activate(model, config)
        with torch.no_grad():
            want = model(x)
        small = sn.extract(copy.deepcopy(model), config)
        with torch.no_grad():
            torch.testing.assert_close(small(x), want, rtol=1e-12, atol=1e-12)
        trainable = sum(p.numel() for n, p in small.named_parameters() if p.requires_grad and not n.startswith("head"))
        assert trainable == sn.count(model, config) == sum(
            sn.costs(model)[b][m][str(s)] for b, per in config.items() for m, s in per.items())


def test_lora_updates_query_and_value_only():
    _, model, sn = _supernet(dtype=torch.float64)
    qkv = model.blocks[0].block.attn.qkv
    qkv.active = 2
    x = torch.randn(3, 32, dtype=torch.float64)
    with torch.no_grad():
        delta = qkv(x) - qkv.base(x)
        d = 32
        q = x @ qkv.down[0, :2].T @ qkv.up[0, :, :2].T
        v = x @ qkv.down[1, :2].T @ qkv.up[1, :, :2].T
    torch.testing.assert_close(delta, torch.cat((q, torch.zeros(3, d, dtype=torch.float64), v), -1), rtol=1e-12, atol=1e-12)


def test_sampler_is_seeded_and_reaches_every_size():
    _, model, sn = _supernet()
    draw = sn.sampler(model)
    a = [draw(torch.Generator().manual_seed(s), activate=False) for s in range(30)]
    b = [draw(torch.Generator().manual_seed(s), activate=False) for s in range(30)]
    assert a == b
    seen = {m: {per[m] for c in a for per in c.values()} for m in noah.MODULES}
    assert seen == {m: set(SPACE["choices"][m]) for m in noah.MODULES}


def test_supernet_file_round_trip(tmp_path):
    _, model, sn = _supernet()
    config = sn.sample(model, torch.Generator().manual_seed(1))
    sn.activate(model, config)
    sn.save(model, tmp_path / "s.safetensors", tmp_path / "s.yaml", {"note": 1})
    assert sn.metadata(tmp_path / "s.safetensors") == {"note": 1}
    torch.manual_seed(0)  # the same backbone (a run's comes from its checkpoint)
    fresh = tiny_vit().eval()
    sn.load(fresh, tmp_path / "s.safetensors")
    assert sn.active(fresh) == config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize("space,needle", [
    ({"method": "noah", "choices": {"prompt": [0, 5], "lora": [0]}}, "choices.adapter: expected a non-empty list"),
    ({"method": "noah", "choices": {"prompt": [0, -1], "lora": [0], "adapter": [1]}}, "choices.prompt"),
    ({"method": "noah", "choices": {"prompt": [1], "lora": [1], "adapter": [1], "vpt": [1]}}, "unknown key(s) vpt"),
])
def test_bad_spaces_are_refused_in_one_line(space, needle):
    with pytest.raises(methods.MethodError, match=None) as err:
        supernet_for(space)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_sub_network_that_does_not_fit_is_refused():
    _, model, sn = _supernet()
    with pytest.raises(methods.MethodError, match=r"blocks.0.lora: expected a size in 0..4, got 8"):
        sn.activate(model, {"blocks.0": {"prompt": 0, "lora": 8, "adapter": 0}, "blocks.1": {"prompt": 0, "lora": 0, "adapter": 0}})


def test_non_vit_is_refused():
    with torch.device("meta"):
        model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(methods.MethodError, match="noah: needs a timm VisionTransformer"):
        NoahSupernet(SPACE).apply(model)


def test_the_shipped_space_is_noahs():
    from conftest import ROOT

    sn = supernet_for(str(ROOT / "configs" / "space" / "noah.yaml"))
    assert isinstance(sn, NoahSupernet) and sn.space.largest() == {"prompt": 10, "lora": 8, "adapter": 8}


def test_noah_runs_the_three_stages_and_its_export_evaluates(tmp_path, capsys):
    """train.py trains NOAH's supernet, search.py (search/'s evolution) keeps the budget, retrain.py
    slices the choice out and exports adapted.safetensors, which evaluate.py scores as retrain did."""
    import json

    import yaml

    from engine import distributed as dist
    from engine.config import config_from_dict
    from engine.evaluate import main as evaluate
    from engine.recipes.retrain import run_retrain
    from engine.recipes.search import run_search
    from engine.recipes.train import run_train
    from runcfg import tiny_config, write_config

    out, info = tmp_path / "run", dist.DistInfo()
    sections = {"space": SPACE, "search": {"max_params": 1200}}
    cfg = config_from_dict(tiny_config(out, **sections))
    assert run_train(cfg, info, "t") == run_search(cfg, info, "t") == run_retrain(cfg, info, "t") == "done"
    result = yaml.safe_load((out / "search" / "result.yaml").read_text())
    assert result["params"] <= 1200 and set(result["subnet"]) == {"blocks.0", "blocks.1"}
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    assert m["method"] == "noah" and m["exported"] == "adapted.safetensors" and m["adapter_params"] == result["params"]
    capsys.readouterr()
    path = write_config(tmp_path / "c.yaml", out, **sections)
    assert evaluate(argv=["--config", str(path), "--checkpoint", str(out / "retrain" / "adapted.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == pytest.approx(m["test_top1"])


def _noah_train(out, **train):
    from engine import distributed as dist
    from engine.config import config_from_dict
    from engine.recipes.train import run_train
    from runcfg import tiny_config

    cfg = config_from_dict(tiny_config(out, space=SPACE, train=train, model={"drop_path_rate": 0.0}))
    return run_train(cfg, dist.DistInfo(), "t")


def test_an_interrupted_noah_supernet_resumes_to_the_same_tensors(tmp_path):
    from safetensors.torch import load_file

    from runcfg import trainer_hooks

    assert _noah_train(tmp_path / "a") == "done"
    with trainer_hooks(stop_at_step=2):
        assert _noah_train(tmp_path / "b") == "SIGTERM"
    assert _noah_train(tmp_path / "b") == "done"
    a, b = (load_file(tmp_path / r / "supernet.safetensors") for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_train_the_noah_supernet_as_one(tmp_path):
    """As for every retrained method (tests/test_methods_pipeline.py): two ranks of 16 images a step
    take the halves of one process's 32, the sub-network of a step is the same on every rank."""
    import os
    import subprocess
    import sys

    from runcfg import ROOT, write_config

    cfg = write_config(tmp_path / "c.yaml", tmp_path / "two", space=SPACE, model={"drop_path_rate": 0.0})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _noah_train(tmp_path / "one", batch_size=32) == "done"
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in ("one", "two"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
