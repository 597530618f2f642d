"""The benchmark's machinery end to end on a tiny ViT (targets are checked by running the benchmark, not here)."""

import json
import math

from conftest import needs_cxx
from bench import run as bench_run

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def test_quick_bench_machinery_writes_every_key(tmp_path):
    out = tmp_path / "results.json"
    argv = ["--quick", "--out", str(out), "--models", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--warmup", "1", "--steps", "1", "--val-images", "16", "--num-classes", "5"]
    returned = bench_run.main(argv)
    doc = json.loads(out.read_text())
    assert doc == json.loads(json.dumps(returned))

    label = next(iter(doc["models"]))
    for key in bench_run.KEYS:
        value = doc[key][label]
        assert math.isfinite(value) and value > 0, (key, value)
        assert isinstance(doc["met"][key][label], bool)
        assert key in doc["targets"]
    model = doc["models"][label]
    assert all(math.isfinite(v) and v > 0 for v in model["median_s"].values())
    assert all(math.isfinite(v) and v > 0 for v in model["images_per_s"].values())
    assert set(model["median_s"]) >= {"supernet", "peft_lora", "subnet_lora", "peft_glora_lora", "subnet_vector", "peft_glora_vector", "merged_forward", "base_forward", "search_candidate", "search_forward"}
    assert all(m["peak_delta_bytes"] > 0 for m in model["memory"].values())
    assert doc["machine"]["cpu_count"] >= 1 and doc["torch"] and doc["timm"]
    assert model["settings"]["batch"] == 8 and model["settings"]["threads"] == 2
    assert set(model["floor"]) == {"frozen_vs_peft_glora_step_vector"} and model["floor"]["frozen_vs_peft_glora_step_vector"] > 0
    assert "frozen" in model["median_s"]
    timed = [k for k in bench_run.KEYS if not k.endswith("_peak_mem")]
    assert set(doc["ci95"]) == set(bench_run.KEYS) and all(label in doc["ci95"][k] for k in timed)
    for k in timed:
        lo, hi = doc["ci95"][k][label]
        assert lo <= doc[k][label] <= hi, (k, lo, doc[k][label], hi)


def test_only_measures_the_keys_asked_for(tmp_path, capsys):
    """--only: a short GPU loan times just the pairs it needs; the table and results name only those."""
    out = tmp_path / "only.json"
    key = "subnet_vs_peft_glora_step_vector"
    argv = ["--quick", "--out", str(out), "--models", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--warmup", "1", "--steps", "1", "--num-classes", "5", "--only", key]
    bench_run.main(argv)
    doc = json.loads(out.read_text())
    label = next(iter(doc["models"]))
    assert [k for k in bench_run.KEYS if doc[k]] == [key] and doc["met"][key][label] in (True, False)
    assert set(doc["models"][label]["median_s"]) == {"subnet_vector", "peft_glora_vector", "frozen"}
    assert doc["models"][label]["memory"] == {} and set(doc["models"][label]["floor"]) == {"frozen_vs_peft_glora_step_vector"}
    table = capsys.readouterr().out
    assert key in table and "supernet_vs_lora_step" not in table and "peak step memory" not in table
    # a second model that was not measured on the key gets a "-" cell, not an error
    doc["models"]["other"] = doc["models"][label]
    row = next(line for line in bench_run.format_table(doc).splitlines() if line.startswith(key))
    assert row.rstrip().endswith("-") and ("MISS" in row or "ok" in row)


def test_unknown_model_is_one_line(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        bench_run.main(["--quick", "--out", str(tmp_path / "x.json"), "--models", "vit_tiny_patch16_224", "not_a_model"])
    assert exit_.value.code == 2 and "--models: unknown timm model(s) not_a_model" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_median_interval_uses_the_binomial_ranks():
    """Known order-statistic ranks of a 95% interval for the median: (2, 9) of 10, (6, 15) of 20, (14, 27) of 40."""
    import pytest

    for n, (lo, hi) in {10: (2, 9), 20: (6, 15), 40: (14, 27)}.items():
        values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
        assert bench_run.median_ci(values) == (lo, hi)
    assert bench_run.median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)  # too few rounds for 95%: the whole range
    assert bench_run.median_ci(list(range(10)), level=0.5)[0] > 1  # a lower level narrows it
    with pytest.raises(ValueError):
        bench_run.median_ci([])
    assert bench_run._within_noise("subnet_vs_peft_glora_step_vector", [0.49, 0.51])
    assert not bench_run._within_noise("subnet_vs_peft_glora_step_vector", [0.45, 0.49])


def test_bench_model_under_bf16_autocast():
    """The CUDA mode's settings (bf16 autocast) exercised on CPU autocast, so a GPU session only has to run it."""
    from dataclasses import replace

    from bench.contenders import ModelSpec

    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY), 32, 5)
    s = replace(bench_run.quick_settings(), amp=True, warmup=1, steps=1, fwd_steps=1, val_images=16, val_batch=8, candidates=1, mem_steps=1)
    res = bench_run.bench_model(spec, s, log=lambda _: None)
    assert set(res["ratios"]) == set(bench_run.KEYS)
    assert all(math.isfinite(v) and v > 0 for v in res["ratios"].values())
    assert res["settings"]["amp"] is True


@needs_cxx
def test_compiled_contenders():
    """--compile: a fixed sub-network is wrapped by torch.compile and trains; the supernet is refused."""
    import pytest
    import torch

    from bench import contenders as C
    from bench.contenders import ModelSpec

    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY), 32, 5)
    base = spec.build(0)
    c = C.build_train_contender("subnet_vector", base, 0, compile="reduce-overhead")  # on a CPU: the default mode
    assert isinstance(c.model, torch._dynamo.eval_frame.OptimizedModule) and c.compile_mode == "reduce-overhead"
    assert C.build_train_contender("frozen", base, 0, compile=True).compile_mode == "default"
    x, y = bench_run.make_batch(spec, 2, "cpu", 0)
    before = [p.detach().clone() for p in c.model.parameters() if p.requires_grad]
    C.train_step(c, x, y)()
    after = [p.detach() for p in c.model.parameters() if p.requires_grad]
    assert any((a - b).abs().max() > 0 for a, b in zip(after, before))
    with pytest.raises(ValueError, match="recompile"):
        C.build_train_contender("supernet", base, 0, compile=True)


@needs_cxx
def test_compiled_contender_is_checked_against_eager():
    """bench.run times a compiled contender only after one step's gradients matched the eager
    model's; a compiled model that computes something else is refused with the difference."""
    import copy

    import pytest
    import torch

    from bench import contenders as C
    from bench.contenders import ModelSpec

    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY), 32, 5)
    base = spec.build(0)
    x, y = bench_run.make_batch(spec, 2, "cpu", 0)
    c = C.build_train_contender("subnet_vector", base, 0, compile=True)
    assert C.check_compiled(c, x, y) < 1e-4
    # a "compiled" model whose adapters differ from the eager model it claims to wrap
    wrong = copy.deepcopy(c.model._orig_mod)
    with torch.no_grad():
        for p in wrong.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    assert C.gradient_difference(c.model._orig_mod, wrong, x, y) > C.COMPILED_GRAD_TOL
    bad = C.Contender("subnet_vector", torch.compile(wrong), compile_mode="default")
    bad.model._orig_mod = c.model._orig_mod  # claims to wrap the eager model, computes with other weights
    with pytest.raises(RuntimeError, match="differ from eager"):
        C.check_compiled(bad, x, y)


def test_host_bound_bench_writes_ratios_and_op_counts(tmp_path):
    """bench.host end to end on a 2-block model: ratios, floor and operations per step for every contender."""
    from bench import host

    out = tmp_path / "host.json"
    doc = host.run(host.HostSettings(depth=2, warmup=1, rounds=2, count_steps=1), out, log=lambda _: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert set(doc["ratios"]) == set(bench_run.TRAIN_PAIRS)
    assert all(math.isfinite(v) and v > 0 for v in doc["ratios"].values())
    assert set(doc["floor"]) == {"frozen_vs_peft_glora_step_vector"}
    ops = doc["ops_per_step"]
    assert set(ops) == {"supernet", "peft_lora", "subnet_lora", "peft_glora_lora", "subnet_vector", "peft_glora_vector", "frozen"}
    # every adapter adds operations to the frozen model's step; views are not counted
    assert all(ops[n] > ops["frozen"] > 0 for n in ops if n != "frozen")
    assert "view" not in doc["top_ops"]["subnet_vector"] and "mm" in doc["top_ops"]["frozen"]


@needs_cxx
def test_profile_eager_and_compiled(tmp_path):
    """bench.profile writes a table per contender, compiled ones under their own name after the
    gradient check; --compile-mode refuses the supernet."""
    import pytest

    from bench import profile
    from bench.contenders import ModelSpec

    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY), 32, 5)
    for mode in (None, "default"):
        assert profile.profile_contender("subnet_vector", spec, "cpu", 2, False, 1, tmp_path, mode) == "subnet_vector"
    tables = {p.name: p.read_text() for p in tmp_path.glob("profile-*.txt")}
    assert set(tables) == {"profile-subnet_vector.txt", "profile-subnet_vector-compiled-default.txt"}
    assert all("Self CPU" in t for t in tables.values())
    with pytest.raises(SystemExit):
        profile.main(["--compile-mode", "default", "--contenders", "supernet", "--out", str(tmp_path)])


def test_loader_bench_writes_both_contenders(tmp_path):
    """bench.loader on a few small JPEGs: both contenders timed per worker count, ratio recorded."""
    from bench.loader import main

    out = tmp_path / "loader.json"
    assert main(["--images", "16", "--size", "32", "--workers", "0", "--epochs", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["workers"] == 0 and row["speedup"] > 0 and len(row["epoch_s"]["cached"]) == 1
    assert result["cache_fill_s"] > 0


def test_conv_pairs_are_recorded_in_their_own_section(tmp_path, capsys):
    """The convolution pairs (docs/convolutions.md) on a tiny CNN: LoRA on its convolutions against
    PEFT's, and its merged conv-space sub-network against it, in the results' "conv" section."""
    out = tmp_path / "conv.json"
    argv = ["--quick", "--out", str(out), "--models", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--warmup", "1",
            "--steps", "2", "--num-classes", "5", "--conv-model", "test_efficientnet", "--conv-img-size", "32",
            "--only", *bench_run.CONV_KEYS]
    bench_run.main(argv)
    doc = json.loads(out.read_text())
    assert not any(doc[k] for k in bench_run.KEYS)
    conv = doc["conv"]
    for key in bench_run.CONV_KEYS:
        value = conv[key]["test_efficientnet"]
        assert math.isfinite(value) and value > 0 and isinstance(conv["met"][key]["test_efficientnet"], bool)
        lo, hi = conv["ci95"][key]["test_efficientnet"]
        assert lo <= value <= hi
    assert set(conv["models"]["test_efficientnet"]["median_s"]) == {"conv_subnet_lora", "peft_lora_conv", "conv_merged_forward", "conv_base_forward"}
    table = capsys.readouterr().out
    assert all(k in table for k in bench_run.CONV_KEYS)


def test_lora_family_bench_times_every_option(tmp_path):
    """bench.lorafamily --quick: every option of the lora block against plain LoRA (ratios with their
    intervals), the supernet with LoRA-Pro, the one-off inits; and the page it writes."""
    from bench import lorafamily

    out, page = tmp_path / "r.json", tmp_path / "p.md"
    doc = lorafamily.main(["--quick", "--out", str(out), "--report", str(page)])
    assert json.loads(out.read_text())["ratios"] == doc["ratios"]
    want = {f"{n}_vs_lora_step" for n in lorafamily.OPTIONS if n != "lora"} | {"supernet_lora_pro_vs_supernet_step"}
    assert set(doc["ratios"]) == want
    assert all(v["ratio"] > 0 and v["ci95"][0] <= v["ratio"] <= v["ci95"][1] for v in doc["ratios"].values())
    assert set(doc["init_s"]) == {"pissa", "lora_ga"} and all(s > 0 for s in doc["init_s"].values())
    text = page.read_text()
    assert "| lora_pro |" in text and "<= 1.3" in text and "lora_ga (2 gradient batches + SVDs)" in text
